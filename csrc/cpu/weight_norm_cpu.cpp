// Weight norm on the CPU: one parallel pass per direction. A thread owns whole slices when
// there are enough of them: it reduces a slice (sum of squares forward, sum of grad_w * v
// backward) and writes it right away, while it is in cache. Few slices (the whole-tensor
// norm) are cut into pieces reduced in parallel, then written in parallel. Short dense rows
// (dim 0 of a narrow weight) go in batches, a row per vector lane. Slices made of short runs
// (the last-dim norm) are walked row by row, vectorized across slices.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <vector>

#include "common/weight_norm_math.h"
#include "cpu/lanes.h"
#include "cpu/stream_store.h"
#include "weight_norm.h"

namespace fastnorm::cpu {
namespace {

using at::vec::Vectorized;

constexpr int64_t kChunk = 8192;    // values summed in float32 before adding into float64
constexpr int64_t kPiece = 65536;   // values per piece when slices are shared between threads
// Values below which a loop stays on one thread. Low, as torch's own kernels: in a network the
// other threads are still spinning from the previous op's parallel region, so sharing even a
// 16K-value weight costs less than leaving them idle (weight-normed Linear 128x128 layer,
// fwd+bwd: 1.25x -> 1.16x of torch's time with 4096 instead of 32768).
constexpr int64_t kGrain = 4096;
// Slices of fewer values than kGroupValues are reduced, finished and written in groups of
// up to kMaxGroup slices (kGroupValues values: the group is still in L1 for the writes).
// One slice at a time, each waited for its square root and division before its writes
// (one thread, forward, against torch's 11 us: a (2048, 16) weight 36 us, 22 us grouped;
// (256, 128): 9.6 us, 8.0 us). Slices of 2304 values and more are not grouped: grouped by
// 8, they were 25% slower.
constexpr int64_t kGroupValues = 2048;
constexpr int64_t kMaxGroup = 16;
constexpr int64_t kMinRun = 32;     // runs shorter than this take the short-run path
constexpr int64_t kRowBlock = 256;  // rows per block of the short-run reduction
constexpr int64_t kColumns = 4096;  // positions per chunk of a short-run row

// sum(p * q) over n values: chunks of kChunk summed in the accumulation type with four
// independent accumulators (span_loop), chunk totals added in float64; up to kOneAcc vectors,
// one accumulator.
template <typename T, int64_t kOneAcc = 4>
C10_ALWAYS_INLINE double dot(const T* __restrict p, const T* __restrict q, int64_t n) {
  using L = Lanes<T>;
  using Vec = typename L::Vec;
  double total = 0;
  if (n < L::kWidth) {  // a short run: no horizontal vector sum
    for (int64_t i = 0; i < n; ++i) total += double(p[i]) * double(q[i]);
    return total;
  }
  if (n <= kOneAcc * L::kWidth) {  // a short slice: one accumulator
    Vec acc[L::kVecs];
    for (auto& v : acc) v = Vec(0);
    int64_t i = 0;
    auto step = [&](int64_t j, auto cnt) FASTNORM_INLINE_LAMBDA {
      Vec x[L::kVecs], y[L::kVecs];
      L::load(p + j, x, cnt);
      L::load(q + j, y, cnt);
      for (int64_t k = 0; k < L::kVecs; ++k) acc[k] = at::vec::fmadd(x[k], y[k], acc[k]);
    };
    for (; i + L::kWidth <= n; i += L::kWidth) step(i, typename L::Full{});
    if (i < n) step(i, n - i);
    Vec sum = acc[0];
    for (int64_t k = 1; k < L::kVecs; ++k) sum = sum + acc[k];
    return double(at::vec::vec_reduce_all<at::opmath_type<T>>([](Vec a, Vec b) { return a + b; }, sum));
  }
  for (int64_t c = 0; c < n; c += kChunk) {
    const int64_t m = std::min(kChunk, n - c);
    Vec acc[4][L::kVecs];
    for (auto& a : acc) {
      for (auto& v : a) v = Vec(0);
    }
    span_loop<L::kWidth>(m, [&](int64_t i, auto cnt, auto u) {
      Vec x[L::kVecs], y[L::kVecs];
      L::load(p + c + i, x, cnt);
      L::load(q + c + i, y, cnt);  // a partial vector loads zeros past the end
      for (int64_t k = 0; k < L::kVecs; ++k) acc[u][k] = at::vec::fmadd(x[k], y[k], acc[u][k]);
    });
    Vec sum = Vec(0);
    for (auto& a : acc) {
      for (auto& v : a) sum = sum + v;
    }
    total += double(at::vec::vec_reduce_all<at::opmath_type<T>>([](Vec a, Vec b) { return a + b; }, sum));
  }
  return total;
}

// Per-slice coefficients of the element passes: one per lane read from an array (kPerLane:
// last-dim slices, where consecutive values belong to consecutive slices; the arrays are
// padded to whole vectors), or one value for a whole span (slices with runs).
template <typename acc_t, bool kPerLane>
struct Coef {
  const acc_t* p;
  Vectorized<acc_t> at(int64_t i) const { return Vectorized<acc_t>::loadu(p + i); }
  acc_t value(int64_t i) const { return p[i]; }
};

// Held by value: through a pointer of the output's type it would be reloaded after every
// store.
template <typename acc_t>
struct Coef<acc_t, false> {
  acc_t v;
  Vectorized<acc_t> at(int64_t) const { return Vectorized<acc_t>(v); }
  acc_t value(int64_t) const { return v; }
};

// out = in * s over n values; streaming stores for large outputs (stream_store.h).
template <typename T, bool kPerLane>
C10_ALWAYS_INLINE void scale_span(T* __restrict out, const T* __restrict in, int64_t n,
                                  Coef<at::opmath_type<T>, kPerLane> s, bool stream) {
  using L = Lanes<T>;
  if (n < L::kWidth) {  // a short run: a partial vector would cost more than the values
    for (int64_t i = 0; i < n; ++i) out[i] = T(at::opmath_type<T>(in[i]) * s.value(i));
    return;
  }
  span_loop<L::kWidth>(n, [&](int64_t i, auto cnt, auto) {
    typename L::Vec x[L::kVecs];
    L::load(in + i, x, cnt);
    for (int64_t k = 0; k < L::kVecs; ++k) x[k] = x[k] * s.at(i + k * L::Vec::size());
    L::store(out + i, x, cnt, stream);
  });
}

// grad_v = a * (grad_w + c * v) over n values (wn_grad_v, vectorized), streaming as
// scale_span. out may be grad_w itself (each value is read before it is written).
// c = c_hi + c_lo keeps the exact cancellation of a slice parallel to its gradient, which
// short slices need (one value: always). With kLo false (slices of kMinRun values or
// more) c_hi alone, as accurate as torch's kernel: the loop is bound by its arithmetic,
// and one operation fewer per vector makes it 1.15x faster.
template <typename T, bool kPerLane, bool kLo = true>
C10_ALWAYS_INLINE void grad_v_span(T* out, const T* gw, const T* __restrict v, int64_t n,
                                   Coef<at::opmath_type<T>, kPerLane> a, Coef<at::opmath_type<T>, kPerLane> c_hi,
                                   Coef<at::opmath_type<T>, kPerLane> c_lo, bool stream) {
  using L = Lanes<T>;
  using acc_t = at::opmath_type<T>;
  if (n < L::kWidth) {  // a short run (as scale_span)
    for (int64_t i = 0; i < n; ++i) {
      const acc_t lo = kLo ? c_lo.value(i) : acc_t(0);
      out[i] = T(wn_grad_v<acc_t>({acc_t(0), a.value(i), c_hi.value(i), lo}, acc_t(gw[i]), acc_t(v[i])));
    }
    return;
  }
  span_loop<L::kWidth>(n, [&](int64_t i, auto cnt, auto) {
    typename L::Vec p[L::kVecs], q[L::kVecs];
    L::load(gw + i, p, cnt);
    L::load(v + i, q, cnt);
    for (int64_t k = 0; k < L::kVecs; ++k) {
      const int64_t j = i + k * L::Vec::size();
      if constexpr (kLo) {
        p[k] = a.at(j) * at::vec::fmadd(q[k], c_lo.at(j), at::vec::fmadd(q[k], c_hi.at(j), p[k]));
      } else {
        p[k] = a.at(j) * at::vec::fmadd(q[k], c_hi.at(j), p[k]);
      }
    }
    L::store(out + i, p, cnt, stream);
  });
}

// f(d) for every slice d, in parallel when there are many (per-slice scalar work).
template <typename F>
void for_slices(const WeightNormArgs& a, F&& f) {
  at::parallel_for(0, a.D, kGrain, [&](int64_t d0, int64_t d1) {
    for (int64_t d = d0; d < d1; ++d) f(d);
  });
}

int64_t threads() { return std::max<int64_t>(1, at::get_num_threads()); }

// Whether the backward's slices go one at a time through slice_pass: each one run of at least
// kMinRun values (dim 0 of a dense weight; up to kBatchBackward values they go in batches,
// below), and enough of them to share (kManySlices: four threads' worth). One at a time
// saves the grouped loop's overhead on short slices and is about even from 512 values on.
// The count is fixed, not the thread count: this path's formula rounds differently from the
// grouped one's, and results must not depend on the number of threads.
constexpr int64_t kManySlices = 16;
bool one_by_one(const WeightNormArgs& a) {
  return a.outer == 1 && a.inner >= kMinRun && (a.D >= kManySlices || a.D * a.inner <= kGrain);
}

// Slices with runs (inner > 1, or the whole tensor): the slice's total of p * q over its
// runs, finish(d, total) -> the slice's coefficients once per slice, then
// write(off, n, coefficients) over its runs.
// by_one: one slice at a time (one_by_one(a) must hold).
template <typename T, typename Finish, typename Write>
void slice_pass(const WeightNormArgs& a, const T* p, const T* q, Finish&& finish, Write&& write, bool by_one = false) {
  // A run's products, added into `total` a piece (kPiece values) at a time: the grouped and
  // the shared paths below add the same partial sums in the same order, so that the thread
  // count, which picks the path, does not change the result.
  auto reduce = [p, q](double& total, int64_t off, int64_t n) FASTNORM_INLINE_LAMBDA {
    for (int64_t s = 0; s < n; s += kPiece) total += dot(p + off + s, q + off + s, std::min(kPiece, n - s));
  };
  using C = decltype(finish(int64_t(0), 0.0));
  const int64_t D = a.D, outer = a.outer, inner = a.inner, per_slice = outer * inner;
  auto run_offset = [&](int64_t d, int64_t o) FASTNORM_INLINE_LAMBDA { return (o * D + d) * inner; };
  if (by_one) {  // as torch's kernel: a slice's reduction, coefficients and writes in turn
    at::parallel_for(0, D, D * inner <= kGrain ? D : 1, [&](int64_t d0, int64_t d1) {
      // One accumulator up to 16 vectors: (4096, 96) float32 backward 0.75x -> 1.0x of
      // torch, (1024, 128) 0.90x -> 1.0x (the four-accumulator loop costs more than the
      // latency it hides when the slice's writes follow at once).
      const auto reduce_ = [p, q](int64_t off, int64_t n) FASTNORM_INLINE_LAMBDA { return dot<T, 16>(p + off, q + off, n); };
      const auto finish_ = finish;
      const auto write_ = write;
      const int64_t inner_ = inner;
      for (int64_t d = d0; d < d1; ++d) write_(d * inner_, inner_, finish_(d, reduce_(d * inner_, inner_)));
      stream_fence();
    });
    return;
  }
  if (D >= 4 * threads() || per_slice * D <= kGrain) {
    // Small slices go in groups: the reductions of a group, then its per-slice scalar work
    // (square roots, divisions: independent, so their latencies overlap), then its writes,
    // which re-read the group from L1. The group's coefficients stay on the thread's stack:
    // no shared scratch array whose lines would move between cores.
    const int64_t group = std::clamp<int64_t>(kGroupValues / std::max<int64_t>(per_slice, 1), 1, kMaxGroup);
    at::parallel_for(0, D, per_slice * D <= kGrain ? D : 1, [&](int64_t d0, int64_t d1) {
      // Local copies (the callables capture by value): the vector stores may alias any
      // memory, so values read through the captured references would be loaded again for
      // every slice; locals stay in registers.
      const auto reduce_ = reduce;
      const auto finish_ = finish;
      const auto write_ = write;
      const int64_t D_ = D, outer_ = outer, inner_ = inner, group_ = group;
      double total[kMaxGroup];
      C coef[kMaxGroup];
      for (int64_t d = d0; d < d1; d += group_) {
        const int64_t e = std::min(d1, d + group_);
        for (int64_t i = d; i < e; ++i) {
          total[i - d] = 0;
          for (int64_t o = 0; o < outer_; ++o) reduce_(total[i - d], (o * D_ + i) * inner_, inner_);
        }
        for (int64_t i = d; i < e; ++i) coef[i - d] = finish_(i, total[i - d]);
        for (int64_t i = d; i < e; ++i) {
          for (int64_t o = 0; o < outer_; ++o) write_((o * D_ + i) * inner_, inner_, coef[i - d]);
        }
      }
      stream_fence();
    });
    return;
  }
  // Pieces of at most kPiece values: (slice, run, part of the run).
  const int64_t parts = (inner + kPiece - 1) / kPiece, pieces_per_slice = outer * parts;
  auto piece = [&](int64_t t, int64_t& d, int64_t& off, int64_t& n) {
    d = t / pieces_per_slice;
    const int64_t r = t % pieces_per_slice, o = r / parts, p = r % parts;
    off = run_offset(d, o) + p * kPiece;
    n = std::min(kPiece, inner - p * kPiece);
  };
  const int64_t total_pieces = D * pieces_per_slice;
  std::vector<double> partial(total_pieces);
  at::parallel_for(0, total_pieces, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      int64_t d, off, n;
      piece(t, d, off, n);
      partial[t] = dot(p + off, q + off, n);
    }
  });
  std::vector<C> coef(D);
  for (int64_t d = 0; d < D; ++d) {
    double total = 0;
    for (int64_t t = d * pieces_per_slice; t < (d + 1) * pieces_per_slice; ++t) total += partial[t];
    coef[d] = finish(d, total);
  }
  at::parallel_for(0, total_pieces, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      int64_t d, off, n;
      piece(t, d, off, n);
      write(off, n, coef[d]);
    }
    stream_fence();
  });
}

// Short dense rows (dim 0 of a (D, n) weight, n small): one row at a time, each row's total
// is a horizontal vector sum, then a square root and a division, and its writes wait for
// that chain. Rows go in batches instead, one row per lane of a vector: each row reduces to
// a vector, the batch's vectors to one vector of row totals (lane_totals), and its square
// roots and divisions are one vector operation each. The same operations per row as one at
// a time, in the accumulation type (as torch); only the order of a row's sum differs.
// Measured against one at a time, float32, 2 threads, op against torch: forward (4096, 32)
// 0.77x-0.88x -> 0.96x-1.01x, (2048, 16) 0.76x-0.80x -> 0.92x-0.94x, (1024, 256) 1.15x-1.29x
// -> 1.36x, but (512, 512) 1.23x-1.30x -> 1.11x-1.15x; backward, batched up to 128 values:
// +0.02x-0.05x, beyond that even or slower.
constexpr int64_t kBatchForward = 256, kBatchBackward = 128;  // most values a batched row has
bool row_batches(const WeightNormArgs& a, int64_t min_values, int64_t max_values) {
  return a.outer == 1 && a.inner >= min_values && a.inner <= max_values;
}

// Lane r: the total of p * q over row r of the batch (rows of n values from p and q), for the
// batch's first `rows` rows; the other lanes are zero.
template <bool kSquares, typename T>
C10_ALWAYS_INLINE Vectorized<at::opmath_type<T>> batch_totals(const T* p, const T* q, int64_t n, int64_t rows) {
  using L = Lanes<T>;
  using Vec = typename L::Vec;
  Vec acc[Vec::size()];
  for (int64_t r = 0; r < Vec::size(); ++r) {
    acc[r] = Vec(0);
    if (r >= rows) continue;
    auto step = [&](int64_t i, auto cnt) FASTNORM_INLINE_LAMBDA {
      Vec x[L::kVecs], y[L::kVecs];
      L::load(p + r * n + i, x, cnt);
      if constexpr (!kSquares) L::load(q + r * n + i, y, cnt);
      for (int64_t k = 0; k < L::kVecs; ++k) acc[r] = at::vec::fmadd(x[k], kSquares ? x[k] : y[k], acc[r]);
    };
    int64_t i = 0;
    for (; i + L::kWidth <= n; i += L::kWidth) step(i, typename L::Full{});
    if (i < n) step(i, n - i);  // (a partial vector loads zeros past the end)
  }
  return lane_totals(acc);
}

// Runs f(d, rows) over the batches (rows d .. d + rows), in parallel, then fences streaming
// stores.
template <typename T, typename F>
void for_batches(const WeightNormArgs& a, F&& f) {
  constexpr int64_t R = Lanes<T>::Vec::size();
  const int64_t batches = (a.D + R - 1) / R;
  at::parallel_for(0, batches, a.D * a.inner <= kGrain ? batches : 1, [&](int64_t b0, int64_t b1) {
    const auto f_ = f;  // (a local copy: its captures stay in registers, see slice_pass)
    const int64_t D = a.D;
    for (int64_t b = b0; b < b1; ++b) f_(b * R, std::min(R, D - b * R));
    stream_fence();
  });
}

// The norms of a batch's rows (wn_norm), as a vector.
template <typename T>
C10_ALWAYS_INLINE Vectorized<at::opmath_type<T>> batch_norms(const T* v, int64_t n, int64_t rows, double eps) {
  using A = at::opmath_type<T>;
  return (batch_totals<true>(v, v, n, rows) + Vectorized<A>(A(eps))).sqrt();
}

// g's values for a batch's rows (1 past the last row), as a vector.
template <typename T, typename A>
C10_ALWAYS_INLINE Vectorized<A> batch_values(const SliceValues<T, A>& g, int64_t d, int64_t rows) {
  A x[Vectorized<A>::size()];
  for (int64_t r = 0; r < Vectorized<A>::size(); ++r) x[r] = r < rows ? A(g.get(d + r)) : A(1);
  return Vectorized<A>::loadu(x);
}

// Short runs (inner < kMinRun: the last-dim norm, or a middle dim over a few values, as a
// conv weight's dim 1): calls per run would cost more than the values. The weight is
// walked as `outer` rows of W = D * inner values instead, vectorized along the rows, each
// position of a row belonging to slice position / inner.

// Column totals of p * q down the rows. Tasks are (block of kRowBlock rows, chunk of
// kColumns columns); a task walks its rows kRowGroup at a time, each row segment front to
// back (prefetch-friendly), adding the group's products into the chunk's sums with one
// load and store of the sums per group. kExact (a dot of two tensors, backward): each
// product is taken exactly as a float sum hi + lo (lo = p * q - hi by a fused
// multiply-subtract), as a slice can be a single value, where a rounded product would set
// the precision of the gradient. Sums of squares (forward, norms) cancel nothing and take
// plain fused multiply-adds (a (1024, 256) weight's dim-1 forward, one thread: 0.77x-0.80x
// of torch with the lo half, 0.81x-0.86x without).
// Blocks add in the accumulation type; their totals in float64, in a fixed order.
// kSquares: q is p (sums of squares), loaded once.
template <bool kExact, bool kSquares, typename T>
void column_totals(const T* p, const T* q, int64_t rows, int64_t W, double* total) {
  using L = Lanes<T>;
  using Vec = typename L::Vec;
  constexpr int64_t kRowGroup = 8;
  const int64_t blocks = (rows + kRowBlock - 1) / kRowBlock;
  // Too few blocks for the threads: the columns are shared out instead (no totals to merge).
  int64_t columns = kColumns;
  if (blocks < threads() && W >= 2 * L::kWidth) {
    const int64_t per = (W + threads() - 1) / threads();
    columns = std::min(kColumns, (per + L::kWidth - 1) / L::kWidth * L::kWidth);
  }
  const int64_t chunks = (W + columns - 1) / columns;
  std::vector<double> part(blocks > 1 ? blocks * W : 0);  // one block: straight into total
  double* block_totals = blocks > 1 ? part.data() : total;
  at::parallel_for(0, blocks * chunks, 1, [&](int64_t t0, int64_t t1) {
    // Sums for one chunk's columns (padded to whole vectors): sized and cleared for the
    // chunk, not for kColumns (a (1024, 256) weight cleared 16 KiB per task for 1 KiB of sums).
    const int64_t width = std::min(columns, W) + L::kWidth;
    std::vector<at::opmath_type<T>> hi(width), lo(kExact ? width : 0);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / chunks, c0 = (t % chunks) * columns, nc = std::min(columns, W - c0);
      std::fill_n(hi.begin(), nc + L::kWidth, 0);
      if constexpr (kExact) std::fill_n(lo.begin(), nc + L::kWidth, 0);
      const int64_t r_end = std::min(rows, (b + 1) * kRowBlock);
      for (int64_t r0 = b * kRowBlock; r0 < r_end; r0 += kRowGroup) {
        const int64_t nr = std::min(kRowGroup, r_end - r0);
        // nw vector widths from column i (the last n values wide) at once: their sums are
        // independent chains, where one width's rows waited on each other's fused
        // multiply-adds. (The unroll pragmas keep the sums in registers: without them GCC
        // kept them on the stack.)
        auto widths = [&](int64_t i, auto nw, int64_t n) FASTNORM_INLINE_LAMBDA {
          constexpr int64_t NW = decltype(nw)::value;
          Vec h[NW][L::kVecs], l[NW][L::kVecs];
#pragma GCC unroll 4
          for (int64_t w = 0; w < NW; ++w) {
            for (int64_t k = 0; k < L::kVecs; ++k) {
              h[w][k] = Vec::loadu(hi.data() + i + w * L::kWidth + k * Vec::size());
              if constexpr (kExact) l[w][k] = Vec::loadu(lo.data() + i + w * L::kWidth + k * Vec::size());
            }
          }
          for (int64_t r = r0; r < r0 + nr; ++r) {
            const int64_t off = r * W + c0 + i;
#pragma GCC unroll 4
            for (int64_t w = 0; w < NW; ++w) {
              Vec x[L::kVecs], y[L::kVecs];
              if (w < NW - 1 || n == L::kWidth) {
                L::load(p + off + w * L::kWidth, x, typename L::Full{});
                if constexpr (!kSquares) L::load(q + off + w * L::kWidth, y, typename L::Full{});
              } else {
                L::load(p + off + w * L::kWidth, x, n);
                if constexpr (!kSquares) L::load(q + off + w * L::kWidth, y, n);
              }
              for (int64_t k = 0; k < L::kVecs; ++k) {
                const Vec& qk = kSquares ? x[k] : y[k];
                if constexpr (kExact) {
                  const Vec prod = x[k] * qk;
                  h[w][k] = h[w][k] + prod;
                  l[w][k] = l[w][k] + at::vec::fmsub(x[k], qk, prod);
                } else {
                  h[w][k] = at::vec::fmadd(x[k], qk, h[w][k]);
                }
              }
            }
          }
#pragma GCC unroll 4
          for (int64_t w = 0; w < NW; ++w) {
            for (int64_t k = 0; k < L::kVecs; ++k) {
              h[w][k].store(hi.data() + i + w * L::kWidth + k * Vec::size());
              if constexpr (kExact) l[w][k].store(lo.data() + i + w * L::kWidth + k * Vec::size());
            }
          }
        };
        constexpr int64_t kBlock = 4;
        int64_t i = 0;
        for (; i + kBlock * L::kWidth <= nc; i += kBlock * L::kWidth) {
          widths(i, std::integral_constant<int64_t, kBlock>{}, L::kWidth);
        }
        for (; i < nc; i += L::kWidth) widths(i, std::integral_constant<int64_t, 1>{}, std::min(L::kWidth, nc - i));
      }
      for (int64_t j = 0; j < nc; ++j) block_totals[b * W + c0 + j] = double(hi[j]) + (kExact ? double(lo[j]) : 0.0);
    }
  });
  if (blocks > 1) {
    std::fill_n(total, W, 0.0);
    for (int64_t b = 0; b < blocks; ++b) {
      for (int64_t j = 0; j < W; ++j) total[j] += part[b * W + j];
    }
  }
}

// Slices of fewer than kMinRun values, whose gradient can cancel: their dots take exact
// products and grad_v takes c_lo too.
inline bool short_slices(const WeightNormArgs& a) { return a.outer * a.inner < kMinRun; }

// A single row of short runs (a (D, 3) weight's dim 0: contiguous slices) stays with the
// slices: the walk by rows would need per-position arrays as large as the weight.
inline bool short_runs(const WeightNormArgs& a) { return a.D > 1 && a.inner < kMinRun && a.outer > 1; }

// Per-slice totals of p * q for short runs (sums of squares where p == q). Products are
// exact (column_totals<true, false>) only for a dot of two tensors over slices shorter than
// kMinRun, the slices whose gradient can cancel (as grad_v_span's c_lo); longer ones add
// plain products and take c_hi alone, as torch's kernel. Last dim, fwd+bwd against torch:
// (1024, 256) 0.88x-0.91x -> 0.90x-0.95x, 4096x4096 1.07x-1.14x -> 1.11x-1.27x, in
// bfloat16 1.02x-1.08x -> 1.21x-1.27x.
template <typename T>
std::vector<double> short_run_totals(const WeightNormArgs& a, const T* p, const T* q) {
  const bool exact = p != q && short_slices(a);
  auto columns_of = [&](int64_t W, double* out) {
    if (exact) {
      column_totals<true, false>(p, q, a.outer, W, out);
    } else if (p == q) {
      column_totals<false, true>(p, q, a.outer, W, out);
    } else {
      column_totals<false, false>(p, q, a.outer, W, out);
    }
  };
  std::vector<double> total(a.D);
  if (a.inner == 1) {
    columns_of(a.D, total.data());
    return total;
  }
  std::vector<double> columns(a.D * a.inner);
  columns_of(a.D * a.inner, columns.data());
  for_slices(a, [&](int64_t d) {
    total[d] = 0;
    for (int64_t j = 0; j < a.inner; ++j) total[d] += columns[d * a.inner + j];
  });
  return total;
}

// Per-slice values spread over the positions of a row (padded to whole vectors), for the
// element passes of short runs.
template <typename T, typename F>
std::vector<at::opmath_type<T>> row_lanes(const WeightNormArgs& a, F&& value_of_slice) {
  const int64_t W = a.D * a.inner;
  std::vector<at::opmath_type<T>> lanes((W + Lanes<T>::kWidth - 1) / Lanes<T>::kWidth * Lanes<T>::kWidth, 0);
  if (a.inner == 1) {  // (the last dim: a fill per value cost 6% of a (64, 1024) weight's forward)
    for_slices(a, [&](int64_t d) { lanes[d] = value_of_slice(d); });
  } else {
    for_slices(a, [&](int64_t d) { std::fill_n(lanes.begin() + d * a.inner, a.inner, value_of_slice(d)); });
  }
  return lanes;
}

// Runs f(offset, first position, count) over the rows of a short-run weight in chunks of at
// most kColumns positions, in parallel, then fences streaming stores. Rows of one chunk take
// no division per row: a (4096, 32) weight's dim-1 forward, one thread, took 50 us with one
// (torch: 34 us), 37-39 us without. Callers pass f always inlined: called per row, its
// prologue and reloaded captures cost as much as a 32-value row ((4096, 32) dim-1 backward,
// 2 threads: 0.73x-0.77x of torch, 1.01x-1.05x inlined).
template <typename F>
void for_row_chunks(const WeightNormArgs& a, F&& f) {
  const int64_t W = a.D * a.inner, chunks = (W + kColumns - 1) / kColumns;
  at::parallel_for(0, a.outer * chunks, std::max<int64_t>(1, kGrain / std::min(W, kColumns)), [&](int64_t t0, int64_t t1) {
    if (chunks == 1) {
      for (int64_t r = t0; r < t1; ++r) f(r * W, int64_t(0), W);
    } else {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r = t / chunks, c0 = (t % chunks) * kColumns;
        f(r * W + c0, c0, std::min(kColumns, W - c0));
      }
    }
    stream_fence();
  });
}

template <typename T>
void forward_impl(const WeightNormArgs& a) {
  using acc_t = at::opmath_type<T>;
  const T* v = a.v.data_ptr<T>();
  T* w = a.w.data_ptr<T>();
  const SliceValues<T, acc_t> g{a.g.data_ptr(), g_in_acc(a)};
  acc_t* norm = a.norm.data_ptr<acc_t>();
  const bool stream = stream_output(a.w.data_ptr(), a.w.nbytes());
  if (short_runs(a)) {
    std::vector<double> s(a.D);
    const auto ss = short_run_totals(a, v, v);
    for_slices(a, [&](int64_t d) {
      const double n = wn_norm<double>(ss[d], a.eps);
      norm[d] = acc_t(n);
      s[d] = g.get(d) / n;
    });
    const auto scales = row_lanes<T>(a, [&](int64_t d) { return acc_t(s[d]); });
    for_row_chunks(a, [&](int64_t off, int64_t c0, int64_t n) FASTNORM_INLINE_LAMBDA {
      scale_span(w + off, v + off, n, Coef<acc_t, true>{scales.data() + c0}, stream);
    });
    return;
  }
  const double eps = a.eps;
  if (row_batches(a, 1, kBatchForward)) {
    using Vec = Vectorized<acc_t>;
    auto pass = [&](auto streaming) {
      for_batches<T>(a, [v, w, norm, g, eps, n = a.inner](int64_t d, int64_t rows) FASTNORM_INLINE_LAMBDA {
        const Vec norms = batch_norms(v + d * n, n, rows, eps);
        norms.store(norm + d, rows);
        acc_t scale[Vec::size()];
        (batch_values(g, d, rows) / norms).store(scale);
        for (int64_t r = 0; r < rows; ++r) {
          scale_span(w + (d + r) * n, v + (d + r) * n, n, Coef<acc_t, false>{scale[r]}, decltype(streaming)::value);
        }
      });
    };
    stream ? pass(std::true_type{}) : pass(std::false_type{});  // (a constant in the loops)
    return;
  }
  // Grouped slices: the coefficients in float64 (the group's square roots and divisions
  // vectorize), then rounded.
  slice_pass(
      a, v, v,
      [norm, g, eps](int64_t d, double ss) FASTNORM_INLINE_LAMBDA {
        const double n = wn_norm<double>(ss, eps);
        norm[d] = acc_t(n);
        return acc_t(g.get(d) / n);
      },
      [w, v, stream](int64_t off, int64_t n, acc_t scale) FASTNORM_INLINE_LAMBDA {
        scale_span(w + off, v + off, n, Coef<acc_t, false>{scale}, stream);
      });
}

template <typename T>
void backward_impl(const WeightNormArgs& a) {
  using acc_t = at::opmath_type<T>;
  const T* v = a.v.data_ptr<T>();
  const T* gw = a.grad_w.data_ptr<T>();
  T* gv = a.grad_v.data_ptr<T>();
  const SliceValues<T, acc_t> g{a.g.data_ptr(), g_in_acc(a)};
  const acc_t* norm = a.norm.data_ptr<acc_t>();
  const SliceValues<T, acc_t> grad_g{a.grad_g.data_ptr(), g_in_acc(a)};
  const bool stream = stream_output(a.grad_v.data_ptr(), a.grad_v.nbytes());
  auto finish = [g, norm, grad_g](int64_t d, double dt) FASTNORM_INLINE_LAMBDA {
    const auto k = wn_grad<acc_t>(g.get(d), double(norm[d]), dt);
    grad_g.set(d, k.grad_g);
    return k;
  };
  if (short_runs(a)) {
    std::vector<WeightNormGrad<acc_t>> k(a.D);
    const auto dots = short_run_totals(a, gw, v);
    for_slices(a, [&](int64_t d) { k[d] = finish(d, dots[d]); });
    const auto A = row_lanes<T>(a, [&](int64_t d) { return k[d].a; });
    const auto hi = row_lanes<T>(a, [&](int64_t d) { return k[d].c_hi; });
    if (!short_slices(a)) {  // c_hi alone (as the grouped slices below)
      for_row_chunks(a, [&](int64_t off, int64_t c0, int64_t n) FASTNORM_INLINE_LAMBDA {
        const Coef<acc_t, true> c{hi.data() + c0};
        grad_v_span<T, true, false>(gv + off, gw + off, v + off, n, Coef<acc_t, true>{A.data() + c0}, c, c, stream);
      });
      return;
    }
    const auto lo = row_lanes<T>(a, [&](int64_t d) { return k[d].c_lo; });
    for_row_chunks(a, [&](int64_t off, int64_t c0, int64_t n) FASTNORM_INLINE_LAMBDA {
      grad_v_span(gv + off, gw + off, v + off, n, Coef<acc_t, true>{A.data() + c0}, Coef<acc_t, true>{hi.data() + c0},
                  Coef<acc_t, true>{lo.data() + c0}, stream);
    });
    return;
  }
  if (row_batches(a, kMinRun, kBatchBackward)) {  // (as one at a time below: wn_grad_plain's operations)
    using Vec = Vectorized<acc_t>;
    auto pass = [&](auto streaming) {
      for_batches<T>(a, [v, gw, gv, norm, g, grad_g, n = a.inner](int64_t d, int64_t rows) FASTNORM_INLINE_LAMBDA {
        const Vec dots = batch_totals<false>(gw + d * n, v + d * n, n, rows);
        const Vec inv = Vec(acc_t(1)) / Vec::loadu(norm + d, rows);
        const Vec gg = dots * inv;
        acc_t grad_gs[Vec::size()], as[Vec::size()], cs[Vec::size()];
        gg.store(grad_gs);
        (batch_values(g, d, rows) * inv).store(as);
        (gg.neg() * inv).store(cs);
        for (int64_t r = 0; r < rows; ++r) {
          grad_g.set(d + r, grad_gs[r]);
          const int64_t off = (d + r) * n;
          const Coef<acc_t, false> A{as[r]}, c{cs[r]};
          grad_v_span<T, false, false>(gv + off, gw + off, v + off, n, A, c, c, decltype(streaming)::value);
        }
      });
    };
    stream ? pass(std::true_type{}) : pass(std::false_type{});
    return;
  }
  if (one_by_one(a)) {  // in the accumulation type, no c_lo
    slice_pass(
        a, gw, v,
        [g, norm, grad_g](int64_t d, double dt) FASTNORM_INLINE_LAMBDA {
          const auto k = wn_grad_plain<acc_t>(acc_t(g.get(d)), norm[d], acc_t(dt));
          grad_g.set(d, k.grad_g);
          return k;
        },
        // Its own write, not the grouped path's below: sharing that one (with its c_lo
        // branch, never taken here) made this backward 1.5x slower ((2048, 64): 0.66x of torch).
        [gv, gw, v, stream](int64_t off, int64_t n, const WeightNormGrad<acc_t>& k) FASTNORM_INLINE_LAMBDA {
          const Coef<acc_t, false> A{k.a}, hi{k.c_hi};
          if (stream) {
            grad_v_span<T, false, false>(gv + off, gw + off, v + off, n, A, hi, hi, true);
          } else {
            grad_v_span<T, false, false>(gv + off, gw + off, v + off, n, A, hi, hi, false);
          }
        },
        true);
    return;
  }
  slice_pass(
      a, gw, v, finish,
      [gv, gw, v, with_lo = short_slices(a), stream](int64_t off, int64_t n, const WeightNormGrad<acc_t>& k) FASTNORM_INLINE_LAMBDA {
        const Coef<acc_t, false> A{k.a}, hi{k.c_hi}, lo{k.c_lo};
        if (with_lo) {
          grad_v_span<T, false, true>(gv + off, gw + off, v + off, n, A, hi, lo, stream);
        } else if (stream) {  // (the compiled loop still tests the flag per store; a template constant measured slower)
          grad_v_span<T, false, false>(gv + off, gw + off, v + off, n, A, hi, lo, true);
        } else {
          grad_v_span<T, false, false>(gv + off, gw + off, v + off, n, A, hi, lo, false);
        }
      });
}

template <typename T>
void norms_impl(const WeightNormArgs& a) {
  using acc_t = at::opmath_type<T>;
  const T* v = a.v.data_ptr<T>();
  acc_t* norm = a.norm.data_ptr<acc_t>();
  if (short_runs(a)) {
    const auto ss = short_run_totals(a, v, v);
    for_slices(a, [&](int64_t d) { norm[d] = acc_t(wn_norm<double>(ss[d], a.eps)); });
    return;
  }
  if (row_batches(a, 1, kBatchForward)) {  // (as forward)
    for_batches<T>(a, [v, norm, eps = a.eps, n = a.inner](int64_t d, int64_t rows) FASTNORM_INLINE_LAMBDA {
      batch_norms(v + d * n, n, rows, eps).store(norm + d, rows);
    });
    return;
  }
  slice_pass(
      a, v, v,
      [norm, eps = a.eps](int64_t d, double ss) FASTNORM_INLINE_LAMBDA {
        norm[d] = acc_t(wn_norm<double>(ss, eps));  // (as forward)
        return 0;  // (nothing to write)
      },
      [](int64_t, int64_t, int) {});
}

}  // namespace

void weight_norm_forward(const WeightNormArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.v.scalar_type(), "fastnorm_weight_norm_cpu",
                                  [&] { forward_impl<scalar_t>(a); });
}

void weight_norm_backward(const WeightNormArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.v.scalar_type(), "fastnorm_weight_norm_backward_cpu",
                                  [&] { backward_impl<scalar_t>(a); });
}

void weight_norm_norms(const WeightNormArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.v.scalar_type(), "fastnorm_weight_norm_norms_cpu",
                                  [&] { norms_impl<scalar_t>(a); });
}

}  // namespace fastnorm::cpu
