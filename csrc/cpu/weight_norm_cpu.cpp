// Weight norm on the CPU: one parallel pass per direction. A thread owns whole slices when
// there are enough of them: it reduces a slice (sum of squares forward, sum of grad_w * v
// backward) and writes it right away, while it is in cache. Few slices (the whole-tensor
// norm) are cut into pieces reduced in parallel, then written in parallel. The last-dim
// norm (slices strided across rows) reduces blocks of rows vectorized across slices.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <vector>

#include "common/weight_norm_math.h"
#include "cpu/stream_store.h"
#include "weight_norm.h"

namespace fastnorm::cpu {
namespace {

using at::vec::Vectorized;

constexpr int64_t kChunk = 8192;    // values summed in float32 before adding into float64
constexpr int64_t kPiece = 65536;   // values per piece when slices are shared between threads
constexpr int64_t kGrain = 32768;   // values below which a loop stays on one thread
constexpr int64_t kRowBlock = 256;  // rows per block of the last-dim reduction

// The at::vec functional helpers, their lambdas on vectors of the accumulation type
// (float32 for float16/bfloat16 data).
template <typename T>
using Acc = Vectorized<at::opmath_type<T>>;

template <typename T>
double sum_squares(const T* p, int64_t n) {
  double total = 0;
  for (int64_t i = 0; i < n; i += kChunk) {
    total += double(at::vec::map_reduce_all<T>([](Acc<T> x) { return x * x; }, [](Acc<T> x, Acc<T> y) { return x + y; },
                                                p + i, std::min(kChunk, n - i)));
  }
  return total;
}

template <typename T>
double dot(const T* a, const T* b, int64_t n) {
  double total = 0;
  for (int64_t i = 0; i < n; i += kChunk) {
    total += double(at::vec::map2_reduce_all<T>([](Acc<T> x, Acc<T> y) { return x * y; },
                                                 [](Acc<T> x, Acc<T> y) { return x + y; }, a + i, b + i,
                                                 std::min(kChunk, n - i)));
  }
  return total;
}

// out = in * s; large outputs in float32/float64 with streaming stores (stream_store.h).
template <typename T>
void scale_any(T* out, const T* in, int64_t n, double s, bool stream) {
  const auto vs = Acc<T>(at::opmath_type<T>(s));
  if constexpr (std::is_same_v<T, at::opmath_type<T>>) {
    using Vec = Vectorized<T>;
    int64_t i = 0;
    for (; i + Vec::size() <= n; i += Vec::size()) store_maybe_streaming(out + i, Vec::loadu(in + i) * vs, stream);
    if (i < n) (Vec::loadu(in + i, n - i) * vs).store(out + i, n - i);
  } else {
    at::vec::map<T>([vs](Acc<T> x) { return x * vs; }, out, in, n);
  }
}

// grad_v = a * (grad_w + c * v) over n values (wn_grad_v, vectorized); streaming stores as
// scale_any. out may be grad_w itself (each value is read before it is written).
template <typename T>
void grad_v_span(T* out, const T* gw, const T* v, int64_t n, const WeightNormGrad<at::opmath_type<T>>& k, bool stream) {
  const auto va = Acc<T>(k.a), hi = Acc<T>(k.c_hi), lo = Acc<T>(k.c_lo);
  auto f = [va, hi, lo](Acc<T> p, Acc<T> q) { return va * at::vec::fmadd(q, lo, at::vec::fmadd(q, hi, p)); };
  if constexpr (std::is_same_v<T, at::opmath_type<T>>) {
    using Vec = Vectorized<T>;
    int64_t i = 0;
    for (; i + Vec::size() <= n; i += Vec::size()) store_maybe_streaming(out + i, f(Vec::loadu(gw + i), Vec::loadu(v + i)), stream);
    if (i < n) f(Vec::loadu(gw + i, n - i), Vec::loadu(v + i, n - i)).store(out + i, n - i);
  } else {
    at::vec::map2<T>(f, out, gw, v, n);
  }
}

int64_t threads() { return std::max<int64_t>(1, at::get_num_threads()); }

// Slices with runs (inner > 1, or the whole tensor): reduce(off, n) -> partial total over a
// run's values, finish(d, total) once per slice, then write(d, off, n) over its runs.
template <typename Reduce, typename Finish, typename Write>
void slice_pass(const WeightNormArgs& a, Reduce&& reduce, Finish&& finish, Write&& write) {
  const int64_t D = a.D, outer = a.outer, inner = a.inner, per_slice = outer * inner;
  auto run_offset = [&](int64_t d, int64_t o) { return (o * D + d) * inner; };
  if (D >= 4 * threads() || per_slice * D <= kGrain) {
    at::parallel_for(0, D, per_slice * D <= kGrain ? D : 1, [&](int64_t d0, int64_t d1) {
      for (int64_t d = d0; d < d1; ++d) {
        double total = 0;
        for (int64_t o = 0; o < outer; ++o) total += reduce(run_offset(d, o), inner);
        finish(d, total);
        for (int64_t o = 0; o < outer; ++o) write(d, run_offset(d, o), inner);
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
      partial[t] = reduce(off, n);
    }
  });
  for (int64_t d = 0; d < D; ++d) {
    double total = 0;
    for (int64_t t = d * pieces_per_slice; t < (d + 1) * pieces_per_slice; ++t) total += partial[t];
    finish(d, total);
  }
  at::parallel_for(0, total_pieces, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      int64_t d, off, n;
      piece(t, d, off, n);
      write(d, off, n);
    }
    stream_fence();
  });
}

// Last-dim slices (inner == 1): column totals of f(row, column) over `outer` rows of D, in
// float64 (a column can be a single value, where float32 products would set the precision
// of the gradient); block totals added in a fixed order.
template <typename T, typename Contribution>
std::vector<double> column_totals(const WeightNormArgs& a, Contribution&& f) {
  const int64_t D = a.D, rows = a.outer, blocks = (rows + kRowBlock - 1) / kRowBlock;
  std::vector<double> part(blocks * D);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<double> acc(D);
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t r = b * kRowBlock; r < std::min(rows, (b + 1) * kRowBlock); ++r) f(r, acc.data());
      for (int64_t d = 0; d < D; ++d) part[b * D + d] = acc[d];
    }
  });
  std::vector<double> total(D, 0.0);
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t d = 0; d < D; ++d) total[d] += part[b * D + d];
  }
  return total;
}

// acc[d] += p[d] * q[d] for one row (p == q: squares).
template <typename T>
void add_products(double* acc, const T* p, const T* q, int64_t D) {
  for (int64_t d = 0; d < D; ++d) acc[d] += double(p[d]) * double(q[d]);
}

template <typename T>
void forward_impl(const WeightNormArgs& a) {
  using acc_t = at::opmath_type<T>;
  const T* v = a.v.data_ptr<T>();
  T* w = a.w.data_ptr<T>();
  const acc_t* g = a.g.data_ptr<acc_t>();
  acc_t* norm = a.norm.data_ptr<acc_t>();
  const bool stream = a.w.nbytes() >= kStreamBytes;
  std::vector<double> s(a.D);
  if (a.inner == 1 && a.D > 1) {
    const auto ss = column_totals<T>(a, [&](int64_t r, double* acc) { add_products<T>(acc, v + r * a.D, v + r * a.D, a.D); });
    std::vector<T> scales(a.D);
    for (int64_t d = 0; d < a.D; ++d) {
      const double n = wn_norm<double>(ss[d], a.eps);
      norm[d] = acc_t(n);
      s[d] = double(g[d]) / n;
    }
    at::parallel_for(0, a.outer, std::max<int64_t>(1, kGrain / a.D), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t d = 0; d < a.D; ++d) w[r * a.D + d] = T(acc_t(v[r * a.D + d]) * acc_t(s[d]));
      }
    });
    return;
  }
  slice_pass(
      a, [&](int64_t off, int64_t n) { return sum_squares(v + off, n); },
      [&](int64_t d, double ss) {
        const double n = wn_norm<double>(ss, a.eps);
        norm[d] = acc_t(n);
        s[d] = double(g[d]) / n;
      },
      [&](int64_t d, int64_t off, int64_t n) { scale_any(w + off, v + off, n, s[d], stream); });
}

template <typename T>
void backward_impl(const WeightNormArgs& a) {
  using acc_t = at::opmath_type<T>;
  const T* v = a.v.data_ptr<T>();
  const T* gw = a.grad_w.data_ptr<T>();
  T* gv = a.grad_v.data_ptr<T>();
  const acc_t* g = a.g.data_ptr<acc_t>();
  const acc_t* norm = a.norm.data_ptr<acc_t>();
  acc_t* grad_g = a.grad_g.data_ptr<acc_t>();
  const bool stream = a.grad_v.nbytes() >= kStreamBytes;
  std::vector<WeightNormGrad<acc_t>> k(a.D);
  auto finish = [&](int64_t d, double dt) {
    k[d] = wn_grad<acc_t>(double(g[d]), double(norm[d]), dt);
    grad_g[d] = k[d].grad_g;
  };
  if (a.inner == 1 && a.D > 1) {
    const auto dots = column_totals<T>(a, [&](int64_t r, double* acc) { add_products<T>(acc, gw + r * a.D, v + r * a.D, a.D); });
    for (int64_t d = 0; d < a.D; ++d) finish(d, dots[d]);
    at::parallel_for(0, a.outer, std::max<int64_t>(1, kGrain / a.D), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t d = 0; d < a.D; ++d) {
          const int64_t i = r * a.D + d;
          gv[i] = T(wn_grad_v<acc_t>(k[d], acc_t(gw[i]), acc_t(v[i])));
        }
      }
    });
    return;
  }
  slice_pass(
      a, [&](int64_t off, int64_t n) { return dot(gw + off, v + off, n); }, finish,
      [&](int64_t d, int64_t off, int64_t n) { grad_v_span(gv + off, gw + off, v + off, n, k[d], stream); });
}

template <typename T>
void norms_impl(const WeightNormArgs& a) {
  using acc_t = at::opmath_type<T>;
  const T* v = a.v.data_ptr<T>();
  acc_t* norm = a.norm.data_ptr<acc_t>();
  if (a.inner == 1 && a.D > 1) {
    const auto ss = column_totals<T>(a, [&](int64_t r, double* acc) { add_products<T>(acc, v + r * a.D, v + r * a.D, a.D); });
    for (int64_t d = 0; d < a.D; ++d) norm[d] = acc_t(wn_norm<double>(ss[d], a.eps));
    return;
  }
  slice_pass(
      a, [&](int64_t off, int64_t n) { return sum_squares(v + off, n); },
      [&](int64_t d, double ss) { norm[d] = acc_t(wn_norm<double>(ss, a.eps)); }, [](int64_t, int64_t, int64_t) {});
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
