// Batch norm on the CPU.
//
// Work is cut into blocks that fit in cache: a run of one channel's values in the planar
// layout, a run of rows (all channels) in the channels-innermost layout. A block's
// statistics come from one pass of shifted sums (a second, two-pass one in the rare case
// where the shift was far from the mean); blocks merge exactly in float64 (Chan) in a fixed
// order, so results do not depend on the thread count. When one thread owns whole channels
// (planar, enough channels), it normalizes each channel right after its statistics, while
// the values are still in cache: one read from memory instead of torch's three.
//
// The element loops are "span" functions over n consecutive values with restrict pointers
// (so the compiler keeps everything loop-invariant in registers), vectorized with at::vec;
// a span's last, partial vector is loaded and stored with a count.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <numeric>
#include <type_traits>
#include <vector>

#include "batch_norm.h"
#include "cpu/lanes.h"
#include "cpu/stream_store.h"

namespace fastnorm::cpu {
namespace {

using at::vec::Vectorized;

constexpr int64_t kBlock = 4096;          // values per planar block (16 KiB of float32: L1)
constexpr int64_t kRowBlock = 131072;     // values per row block (512 KiB of float32: L2)
constexpr int64_t kMinRowsPerBlock = 256;  // and at least this many values per channel, so that the
                                           // per-channel work that closes a block stays small
constexpr int64_t kMaxAdds = 256;         // additions into one float32 accumulator per block
constexpr int64_t kGrain = 32768;         // values below which a loop stays on one thread
constexpr int64_t kMaxGroupWidth = 4096;  // widest repeating row group (see RowGroups)

template <Activation A, typename Vec>
inline Vec activate_vec(Vec z, Vec slope) {
  if constexpr (A == Activation::ReLU) {
    return at::vec::maximum(z, Vec(0));
  } else if constexpr (A == Activation::LeakyReLU) {
    return Vec::blendv(z * slope, z, z > Vec(0));
  } else if constexpr (A == Activation::SiLU) {
    return z / (Vec(1) + z.neg().exp());
  } else if constexpr (A == Activation::ReLU6) {
    return Vec::blendv(Vec::blendv(z, Vec(0), z <= Vec(0)), Vec(6), z >= Vec(6));  // (a NaN stays NaN)
  } else if constexpr (A == Activation::HardSwish) {
    // as torch's: an infinite z gives inf * 6 / 6 or -inf * 0 (NaN), a NaN stays NaN
    return z * at::vec::minimum(at::vec::maximum(z + Vec(3), Vec(0)), Vec(6)) / Vec(6);
  } else if constexpr (A == Activation::GELU) {
    return Vec(0.5) * z * (Vec(1) + (z * Vec(kInvSqrt2)).erf());
  } else if constexpr (A == Activation::GELUTanh) {
    return Vec(0.5) * z * (Vec(1) + (Vec(kSqrt2OverPi) * (z + Vec(kGeluCubic) * z * z * z)).tanh());
  } else if constexpr (A == Activation::ELU) {
    return Vec::blendv(z.expm1(), z, z > Vec(0));
  } else {
    return z;
  }
}

// Vectorized activation_backward (common/batch_norm_math.h): v is z or the output y.
template <Activation A, typename Vec>
inline Vec activation_backward_vec(Vec dy, Vec v, Vec slope) {
  if constexpr (A == Activation::ReLU) {
    return Vec::blendv(dy, Vec(0), v <= Vec(0));  // a NaN passes dy, as torch's threshold_backward
  } else if constexpr (A == Activation::LeakyReLU) {
    return Vec::blendv(dy * slope, dy, v > Vec(0));
  } else if constexpr (A == Activation::SiLU) {
    const Vec s = Vec(1) / (Vec(1) + v.neg().exp());
    return dy * s * (Vec(1) + v * (Vec(1) - s));
  } else if constexpr (A == Activation::ReLU6) {  // a NaN gives 0, as torch's vectorized path
    return Vec::blendv(Vec(0), dy, (v > Vec(0)) & (v < Vec(6)));
  } else if constexpr (A == Activation::HardSwish) {
    const Vec mid = dy * (v / Vec(3) + Vec(0.5));
    return Vec::blendv(Vec::blendv(dy, mid, v <= Vec(3)), Vec(0), v < Vec(-3));
  } else if constexpr (A == Activation::GELU) {
    const Vec cdf = Vec(0.5) * (Vec(1) + (v * Vec(kInvSqrt2)).erf());
    const Vec pdf = (Vec(-0.5) * v * v).exp() * Vec(kInvSqrt2Pi);
    return dy * (cdf + v * pdf);
  } else if constexpr (A == Activation::GELUTanh) {
    const Vec t = (Vec(kSqrt2OverPi) * (v + Vec(kGeluCubic) * v * v * v)).tanh();
    const Vec d_inner = Vec(kSqrt2OverPi) * (Vec(1) + Vec(3 * kGeluCubic) * v * v);
    return dy * (Vec(0.5) * (Vec(1) + t) + Vec(0.5) * v * (Vec(1) - t * t) * d_inner);
  } else if constexpr (A == Activation::ELU) {
    return Vec::blendv(dy, dy * v.exp(), v <= Vec(0));  // (a NaN passes dy)
  } else {
    return dy;
  }
}

// Per-channel coefficients seen by the element loops, by slot: z = x * scale + shift;
// grad input = (dz - mean_dz) * k_dz + (x - mean) * k_x; the mean for it and for the sums of
// dz * (x - mean) (and the statistics' shift).
enum Slot { kScale = 0, kShift, kDz, kX, kMeanDz, kMean, kSlots };

// Coefficient sources: at(k, p) is slot k for the values at span position p.
// Planar layout: one channel per span, coefficients broadcast.
template <typename acc_t>
struct Broadcast {
  using Vec = Vectorized<acc_t>;
  Vec v[kSlots];
  explicit Broadcast(const acc_t* slot) {
    for (int k = 0; k < kSlots; ++k) v[k] = Vec(slot[k]);
  }
  Vec at(int k, int64_t) const { return v[k]; }
};

// Channels-innermost layout: a span starts a row group; position p holds channel p % C.
// Values per position sit in a PositionTable: `stride` values interleaved vector by vector,
// slot k at column col[k].
template <typename acc_t>
struct Repeated {
  using Vec = Vectorized<acc_t>;
  const acc_t* base = nullptr;
  int64_t stride = 0;
  int64_t col[kSlots] = {};
  Vec at(int k, int64_t p) const { return Vec::loadu(base + p * stride + col[k] * Vec::size()); }
};

// Two sums per vector position: in registers for a planar span (U accumulators, combined
// at the end, for instruction-level parallelism), or one pair per row-group position.
template <typename acc_t>
struct RegisterSums {
  using Vec = Vectorized<acc_t>;
  static constexpr int U = 4;
  Vec v1[U], v2[U];
  RegisterSums() {
    for (int u = 0; u < U; ++u) v1[u] = v2[u] = Vec(0);  // (Vectorized's constructor leaves it undefined)
  }
  template <int u>
  void add(int64_t, const Vec& a, const Vec& b) {
    v1[u] += a;
    v2[u] += b;
  }
  double total1() const { return total(v1); }
  double total2() const { return total(v2); }
  static double total(const Vec* v) {
    return double(at::vec::vec_reduce_all<acc_t>(std::plus<Vec>(), (v[0] + v[1]) + (v[2] + v[3])));
  }
};

// Values per row-group position, `stride` of them interleaved vector by vector
// ([positions / VS][stride][VS]): a vector step touches one stream, and separate arrays
// cannot sit a multiple of 4 KiB apart (the processor stalls loads of one behind stores to
// the other then). Padded for a partial vector that reads past the group's width.
template <typename acc_t>
struct PositionTable {
  static constexpr int64_t VS = Vectorized<acc_t>::size();
  std::vector<acc_t> data;
  int64_t stride;
  PositionTable(int64_t width, int64_t stride_) : data((width / VS + 4) * VS * stride_), stride(stride_) {}
  acc_t& at(int64_t p, int64_t col) { return data[(p - p % VS) * stride + col * VS + p % VS]; }
  const acc_t* ptr(int64_t p, int64_t col) const { return &data[(p - p % VS) * stride + col * VS + p % VS]; }
  // A coefficient source reading slot k from column cols[k].
  Repeated<acc_t> repeated(std::initializer_list<int64_t> cols) const {
    Repeated<acc_t> r;
    r.base = data.data();
    r.stride = stride;
    int k = 0;
    for (int64_t c : cols) r.col[k++] = c;
    return r;
  }
};

// Two sums per position in columns col and col + 1 of a PositionTable.
template <typename acc_t>
struct PositionSums {
  using Vec = Vectorized<acc_t>;
  acc_t* base;
  int64_t stride, col;
  template <int>
  void add(int64_t p, const Vec& a, const Vec& b) {
    acc_t* q = base + p * stride + col * Vec::size();  // p is a multiple of the vector size
    (Vec::loadu(q) + a).store(q);
    (Vec::loadu(q + Vec::size()) + b).store(q + Vec::size());
  }
};

// ---------------------------------------------------------------------------------------
// The element kernels, one span at a time. Every pointer points at the span's first value;
// res, y, out and dz may be null when not used.

template <typename scalar_t>
using Vec_t = typename Lanes<scalar_t>::Vec;

// Pre-activation z = x * scale + shift (+ residual) of one vector block.
template <typename scalar_t, class Cf, class N>
C10_ALWAYS_INLINE void preact(const scalar_t* __restrict res, int64_t i, N n, const Cf& cf,
                              const Vec_t<scalar_t>* xv, Vec_t<scalar_t>* z) {
  using L = Lanes<scalar_t>;
  Vec_t<scalar_t> r[L::kVecs];
  if (res) L::load(res + i, r, n);
  for (int64_t k = 0; k < L::kVecs; ++k) {
    const int64_t p = i + k * Vec_t<scalar_t>::size();
    z[k] = at::vec::fmadd(xv[k], cf.at(kScale, p), cf.at(kShift, p));
    if (res) z[k] = z[k] + r[k];
  }
}

// out = act(z).
template <typename scalar_t, Activation A, class Cf>
void normalize_span(const scalar_t* __restrict x, const scalar_t* __restrict res, scalar_t* __restrict out,
                    int64_t n, const Cf& cf, const Vec_t<scalar_t> slope, bool stream) {
  using L = Lanes<scalar_t>;
  span_loop<L::kWidth>(n, [&](int64_t i, auto cnt, auto) {
    Vec_t<scalar_t> v[L::kVecs], z[L::kVecs];
    L::load(x + i, v, cnt);
    preact<scalar_t>(res, i, cnt, cf, v, z);
    for (int64_t k = 0; k < L::kVecs; ++k) z[k] = activate_vec<A>(z[k], slope);
    L::store(out + i, z, cnt, stream);
  });
}

// The stacked rows jump by a row at each step, a pattern the hardware prefetchers do not
// follow: fetch the same place of the next stack (`ahead` values on) into L2 by hand
// (past the last row it fetches nothing useful, but a prefetch never faults).
template <typename scalar_t>
inline void prefetch_next_stack(const scalar_t* p, int64_t ahead) {
  __builtin_prefetch(p + ahead, 0, 2);
}

// p + off, or null for an absent tensor.
template <typename P>
inline P* offset_or_null(P* p, int64_t off) {
  return p ? p + off : nullptr;
}

// Sums of d and d^2 with d = x - shift (the kMean slot), over `groups` spans of n values
// group_stride apart that share their positions (stacked row groups, see
// stacked_row_spans): one update of the sums per position for all of them. Groups is
// int64_t, or the constant 1 for a single span (the planar layout).
template <typename scalar_t, class Cf, class S, class Groups>
void deviation_sums_span(const scalar_t* __restrict x, int64_t n, const Cf& cf, S& sums, Groups groups,
                         int64_t group_stride) {
  using L = Lanes<scalar_t>;
  span_loop<L::kWidth>(n, [&](int64_t i, auto cnt, auto u) {
    Vec_t<scalar_t> a[L::kVecs], b[L::kVecs];
    for (int64_t g = 0; g < groups; ++g) {
      Vec_t<scalar_t> v[L::kVecs];
      if (groups > 1) prefetch_next_stack(x + g * group_stride + i, groups * group_stride);
      L::load(x + g * group_stride + i, v, cnt);
      for (int64_t k = 0; k < L::kVecs; ++k) {
        const auto d = L::valid(v[k] - cf.at(kMean, i + k * Vec_t<scalar_t>::size()), k, cnt);
        a[k] = g == 0 ? d : a[k] + d;
        b[k] = g == 0 ? d * d : at::vec::fmadd(d, d, b[k]);
      }
    }
    for (int64_t k = 0; k < L::kVecs; ++k) sums.template add<decltype(u)::value>(i + k * Vec_t<scalar_t>::size(), a[k], b[k]);
  });
}

// The gradient at the pre-activation, dz = dy * act'(.), from the output y or the
// recomputed pre-activation.
template <typename scalar_t, Activation A, class Cf, class N>
C10_ALWAYS_INLINE void grad_preact(const scalar_t* __restrict res, const scalar_t* __restrict y, const scalar_t* __restrict dy,
                                   bool needs_z, int64_t i, N n, const Cf& cf, const Vec_t<scalar_t>* xv,
                                   const Vec_t<scalar_t> slope, Vec_t<scalar_t>* dz) {
  using L = Lanes<scalar_t>;
  L::load(dy + i, dz, n);
  if constexpr (A != Activation::None) {
    Vec_t<scalar_t> v[L::kVecs];
    if (needs_z) {
      preact<scalar_t>(res, i, n, cf, xv, v);
    } else {
      L::load(y + i, v, n);
    }
    for (int64_t k = 0; k < L::kVecs; ++k) dz[k] = activation_backward_vec<A>(dz[k], v[k], slope);
  }
}

// Sums of dz and dz * (x - mean), over stacked spans as deviation_sums_span.
template <typename scalar_t, Activation A, class Cf, class S, class Groups>
void grad_sums_span(const scalar_t* __restrict x, const scalar_t* __restrict res, const scalar_t* __restrict y,
                    const scalar_t* __restrict dy, bool needs_z, int64_t n, const Cf& cf, const Vec_t<scalar_t> slope,
                    S& sums, Groups groups, int64_t group_stride) {
  using L = Lanes<scalar_t>;
  span_loop<L::kWidth>(n, [&](int64_t i, auto cnt, auto u) {
    Vec_t<scalar_t> a[L::kVecs], b[L::kVecs];
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t off = g * group_stride;
      Vec_t<scalar_t> v[L::kVecs], dz[L::kVecs];
      if (groups > 1) {
        prefetch_next_stack(x + off + i, groups * group_stride);
        prefetch_next_stack(dy + off + i, groups * group_stride);
      }
      L::load(x + off + i, v, cnt);
      grad_preact<scalar_t, A>(offset_or_null(res, off), offset_or_null(y, off), dy + off, needs_z, i, cnt, cf, v,
                               slope, dz);
      for (int64_t k = 0; k < L::kVecs; ++k) {
        const auto gz = L::valid(dz[k], k, cnt);
        const auto xmu = v[k] - cf.at(kMean, i + k * Vec_t<scalar_t>::size());
        a[k] = g == 0 ? gz : a[k] + gz;
        b[k] = g == 0 ? gz * xmu : at::vec::fmadd(gz, xmu, b[k]);
      }
    }
    for (int64_t k = 0; k < L::kVecs; ++k) sums.template add<decltype(u)::value>(i + k * Vec_t<scalar_t>::size(), a[k], b[k]);
  });
}

// grad input = (dz - mean_dz) * k_dz + (x - mean) * k_x (training), dz * k_dz (evaluation: x takes no
// part, so a non-finite x leaves its gradient finite, as torch's); dz itself into dz_out.
template <typename scalar_t, Activation A, class Cf>
void grad_input_span(const scalar_t* __restrict x, const scalar_t* __restrict res, const scalar_t* __restrict y,
                     const scalar_t* __restrict dy, scalar_t* __restrict dx, scalar_t* __restrict dz_out, bool needs_z,
                     bool training, int64_t n, const Cf& cf, const Vec_t<scalar_t> slope, bool stream) {
  using L = Lanes<scalar_t>;
  span_loop<L::kWidth>(n, [&](int64_t i, auto cnt, auto) {
    Vec_t<scalar_t> v[L::kVecs], dz[L::kVecs];
    L::load(x + i, v, cnt);
    grad_preact<scalar_t, A>(res, y, dy, needs_z, i, cnt, cf, v, slope, dz);
    if (dz_out) L::store(dz_out + i, dz, cnt, stream);
    if (dx) {
      Vec_t<scalar_t> g[L::kVecs];
      for (int64_t k = 0; k < L::kVecs; ++k) {
        const int64_t p = i + k * Vec_t<scalar_t>::size();
        g[k] = training ? at::vec::fmadd(dz[k] - cf.at(kMeanDz, p), cf.at(kDz, p),
                                         (v[k] - cf.at(kMean, p)) * cf.at(kX, p))
                        : dz[k] * cf.at(kDz, p);
      }
      L::store(dx + i, g, cnt, stream);
    }
  });
}

// The tensors of one call, as raw pointers (all in the same dense layout).
template <typename scalar_t>
struct Tensors {
  const scalar_t* x = nullptr;
  const scalar_t* res = nullptr;
  const scalar_t* y = nullptr;   // saved forward output
  const scalar_t* dy = nullptr;
  scalar_t* out = nullptr;       // forward output, or grad input
  scalar_t* dz = nullptr;        // grad at the pre-activation
  bool needs_z = false;
  bool training = true;  // backward: the statistics depend on x
  bool stream = false;  // outputs written with streaming stores (large outputs)
  Vec_t<scalar_t> slope;

  explicit Tensors(const NormArgs& a)
      : x(a.input.data_ptr<scalar_t>()),
        res(a.residual.defined() ? a.residual.data_ptr<scalar_t>() : nullptr),
        needs_z(activation_needs_z(a.act, a.slope)),
        slope(typename Lanes<scalar_t>::acc_t(a.slope)) {}
  explicit Tensors(const BackwardArgs& a) : Tensors(static_cast<const NormArgs&>(a)) {
    dy = a.grad_out.data_ptr<scalar_t>();
    y = a.output.defined() ? a.output.data_ptr<scalar_t>() : nullptr;
    out = a.grad_input.defined() ? a.grad_input.data_ptr<scalar_t>() : nullptr;
    dz = a.grad_preact.defined() ? a.grad_preact.data_ptr<scalar_t>() : nullptr;
    training = a.training;
  }

  template <Activation A, class Cf>
  void normalize(int64_t off, int64_t n, const Cf& cf) const {
    normalize_span<scalar_t, A>(x + off, offset_or_null(res, off), out + off, n, cf, slope, stream);
  }
  using One = std::integral_constant<int64_t, 1>;
  template <class Cf, class S, class Groups = One>
  void deviation_sums(int64_t off, int64_t n, const Cf& cf, S& sums, Groups groups = {}, int64_t stride = 0) const {
    deviation_sums_span<scalar_t>(x + off, n, cf, sums, groups, stride);
  }
  template <Activation A, class Cf, class S, class Groups = One>
  void grad_sums(int64_t off, int64_t n, const Cf& cf, S& sums, Groups groups = {}, int64_t stride = 0) const {
    grad_sums_span<scalar_t, A>(x + off, offset_or_null(res, off), offset_or_null(y, off), dy + off, needs_z, n, cf,
                                slope, sums, groups, stride);
  }
  template <Activation A, class Cf>
  void grad_input(int64_t off, int64_t n, const Cf& cf) const {
    grad_input_span<scalar_t, A>(x + off, offset_or_null(res, off), offset_or_null(y, off), dy + off,
                                 offset_or_null(out, off), offset_or_null(dz, off), needs_z, training, n, cf, slope,
                                 stream);
  }
};

// ---------------------------------------------------------------------------------------
// The two layouts.

// Planar: values k in [k0, k1) of channel c (k = n * S + s) as spans along s.
template <typename F>
inline void planar_spans(const Layout& L, int64_t c, int64_t k0, int64_t k1, F&& f) {
  int64_t n = k0 / L.S, s = k0 % L.S;
  while (k0 < k1) {
    const int64_t len = std::min(L.S - s, k1 - k0);
    f((n * L.C + c) * L.S + s, len);
    k0 += len;
    ++n;
    s = 0;
  }
}

// Channels-innermost: rows are grouped so that a group's width is a multiple of the vector
// width (lcm(C, kWidth) values) when C is small; position j in a group is channel j % C.
// Arrays indexed by position are padded by one vector (a partial block reads past width).
struct RowGroups {
  int64_t C, width, rows;  // width = rows * C values
  RowGroups(int64_t C_, int64_t vec_width) : C(C_) {
    const int64_t l = std::lcm(C_, vec_width);
    width = l <= std::max<int64_t>(kMaxGroupWidth, C_) ? l : C_;
    rows = width / C_;
  }
  // About kRowBlock values, at least kMinRowsPerBlock rows, and at most kMaxAdds float32
  // additions into one position's sum (the precision of float32 accumulation), for M rows.
  // A few blocks are made a multiple of kBlockRound, so that they share out evenly over
  // 2 or 4 threads (7 blocks on 2 threads would leave one thread 4); the blocks depend on
  // the shape alone, never on the thread count, so neither do the results.
  int64_t rows_per_block(int64_t M) const {
    constexpr int64_t kBlockRound = 4, kFewBlocks = 32;
    int64_t r = std::min(std::max(kMinRowsPerBlock, kRowBlock / C), kMaxAdds * rows);
    const int64_t nb = (M + r - 1) / r;
    if (nb > 0 && nb < kFewBlocks) {  // (no rows: nothing to share out)
      const int64_t even = (nb + kBlockRound - 1) / kBlockRound * kBlockRound;
      r = (M + even - 1) / even;
    }
    return std::max<int64_t>(1, (r + rows - 1) / rows) * rows;
  }
};

// Rows [r0, r1) as spans of one row group each (the last may be partial).
template <typename F>
inline void row_spans(const RowGroups& G, int64_t r0, int64_t r1, F&& f) {
  for (int64_t r = r0; r < r1; r += G.rows) f(r * G.C, std::min(r1 - r, G.rows) * G.C);
}

// Rows [r0, r1) for the reductions: whole row groups up to kStack at a time, as
// f(offset, width, groups, width) (the groups' spans are width apart), then the last,
// partial group as f(offset, length, 1, 0). A position's sums are then updated once per
// kStack groups rather than once per group: fewer loads and stores of the sums, and a
// shorter chain through them (which bounds the speed when the input comes from cache).
template <typename F>
inline void stacked_row_spans(const RowGroups& G, int64_t r0, int64_t r1, F&& f) {
  constexpr int64_t kStack = 8;
  const int64_t full = (r1 - r0) / G.rows;
  for (int64_t g = 0; g < full; g += kStack) f((r0 + g * G.rows) * G.C, G.width, std::min(kStack, full - g), G.width);
  const int64_t r = r0 + full * G.rows;
  if (r < r1) f(r * G.C, (r1 - r) * G.C, int64_t(1), int64_t(0));
}

// Column col of a PositionTable from per-channel values (position p holds channel p % C).
template <typename acc_t>
void fill_column(PositionTable<acc_t>& t, int64_t col, const RowGroups& G, const acc_t* per_channel,
                 int64_t channel_stride = 1) {
  for (int64_t j = 0, c = 0; j < G.width; ++j, c = (c + 1 == G.C ? 0 : c + 1)) {
    t.at(j, col) = per_channel[c * channel_stride];
  }
}

// Per-channel totals of column col into per_channel[C], reading the table in order.
template <typename acc_t>
void fold_column(const PositionTable<acc_t>& t, int64_t col, const RowGroups& G, double* per_channel) {
  constexpr int64_t VS = PositionTable<acc_t>::VS;
  std::fill(per_channel, per_channel + G.C, 0.0);
  for (int64_t j0 = 0, c = 0; j0 < G.width; j0 += VS) {
    const acc_t* v = t.ptr(j0, col);
    for (int64_t i = 0; i < VS && j0 + i < G.width; ++i, c = (c + 1 == G.C ? 0 : c + 1)) per_channel[c] += double(v[i]);
  }
}

// Per-thread scratch for row blocks: per position the shift (column 0) and two sums
// (columns 1, 2).
template <typename acc_t>
struct RowScratch {
  PositionTable<acc_t> table;
  std::vector<acc_t> shift;
  std::vector<double> ch1, ch2;
  explicit RowScratch(const RowGroups& G) : table(G.width, 3), shift(G.C), ch1(G.C), ch2(G.C) {}
  // Sets the shift column from `shift` and zeroes the sums.
  PositionSums<acc_t> start(const RowGroups& G) {
    std::fill(table.data.begin(), table.data.end(), acc_t(0));
    fill_column(table, 0, G, shift.data());
    return {table.data.data(), 3, 1};
  }
  Repeated<acc_t> shift_source() const {
    auto r = table.repeated({});
    r.col[kMean] = 0;
    return r;
  }
  void fold(const RowGroups& G, double* s1, double* s2) const {
    fold_column(table, 1, G, s1);
    fold_column(table, 2, G, s2);
  }
};

// ---------------------------------------------------------------------------------------
// Statistics of one block.

// A block's moments come from one pass of sums of d = x - K and d^2 around a pivot K (its
// first value): M2 = sum d^2 - (sum d)^2 / n. This loses precision only when K is far from
// the mean, (mean - K)^2 >> var; then a second pass around the provisional mean gives the
// exact two-pass result.
// Non-finite sums (an infinity or NaN among the values) are taken as they are.
inline bool shifted_moments_ok(double n, double sd, double sdd) {
  constexpr double kMaxCancellation = 256.0;  // lose at most 8 bits to the shift
  return sd * sd <= kMaxCancellation * std::max(sdd * n - sd * sd, 0.0) || sdd == 0.0 || !is_finite(sd) ||
         !is_finite(sdd);
}

template <typename scalar_t>
Moments<double> planar_block_moments(const Tensors<scalar_t>& T, const Layout& L, int64_t c, int64_t k0, int64_t k1) {
  using acc_t = typename Lanes<scalar_t>::acc_t;
  const double n = double(k1 - k0);
  acc_t slot[kSlots] = {};
  slot[kMean] = finite_pivot(acc_t(T.x[((k0 / L.S) * L.C + c) * L.S + k0 % L.S]));  // pivot: the first value
  for (int pass = 0;; ++pass) {
    RegisterSums<acc_t> s;
    const Broadcast<acc_t> shift(slot);
    planar_spans(L, c, k0, k1, [&](int64_t off, int64_t len) { T.deviation_sums(off, len, shift, s); });
    const double sd = s.total1(), sdd = s.total2();
    if (pass == 1 || shifted_moments_ok(n, sd, sdd)) {
      return moments_from_shifted_sums<double>(n, double(slot[kMean]), sd, sdd);
    }
    slot[kMean] = acc_t(double(slot[kMean]) + sd / n);  // provisional mean, then two-pass
  }
}

// Moments of every channel over rows [r0, r1) into out_mean/out_m2 [C]. As
// planar_block_moments, one pass unless a channel's pivot was far from its mean.
template <typename scalar_t>
void row_block_moments(const Tensors<scalar_t>& T, const RowGroups& G, int64_t r0, int64_t r1,
                       RowScratch<typename Lanes<scalar_t>::acc_t>& sc, double* out_mean, double* out_m2) {
  using acc_t = typename Lanes<scalar_t>::acc_t;
  const double n = double(r1 - r0);
  const int64_t C = G.C;
  for (int64_t c = 0; c < C; ++c) sc.shift[c] = finite_pivot(acc_t(T.x[r0 * C + c]));  // pivot: the first row
  for (int pass = 0;; ++pass) {
    auto s = sc.start(G);
    const auto shift = sc.shift_source();
    stacked_row_spans(G, r0, r1, [&](int64_t off, int64_t len, int64_t groups, int64_t stride) {
      T.deviation_sums(off, len, shift, s, groups, stride);
    });
    sc.fold(G, sc.ch1.data(), sc.ch2.data());
    bool ok = true;
    for (int64_t c = 0; c < C && pass == 0; ++c) ok = ok && shifted_moments_ok(n, sc.ch1[c], sc.ch2[c]);
    if (ok) break;
    for (int64_t c = 0; c < C; ++c) sc.shift[c] = acc_t(double(sc.shift[c]) + sc.ch1[c] / n);  // provisional mean
  }
  for (int64_t c = 0; c < C; ++c) {
    const auto m = moments_from_shifted_sums<double>(n, double(sc.shift[c]), sc.ch1[c], sc.ch2[c]);
    out_mean[c] = m.mean;
    out_m2[c] = m.m2;
  }
}

// ---------------------------------------------------------------------------------------
// Per-channel steps. Raw pointers are taken once per call (data_ptr() per channel would
// cost more than the arithmetic).

template <typename acc_t>
acc_t* ptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<acc_t>() : nullptr;
}

template <typename acc_t>
struct Channels {
  const acc_t *weight, *bias, *mean, *var;
  double eps;
  bool training;
  explicit Channels(const NormArgs& a)
      : weight(ptr<acc_t>(a.weight)), bias(ptr<acc_t>(a.bias)), mean(ptr<acc_t>(a.mean)), var(ptr<acc_t>(a.var)),
        eps(a.eps), training(true) {}
  acc_t w(int64_t c) const { return weight ? weight[c] : acc_t(1); }
  acc_t b(int64_t c) const { return bias ? bias[c] : acc_t(0); }

  // Forward coefficients of channel c (mean and var given, or as passed), in float64.
  void forward_slots(int64_t c, acc_t* slot, acc_t m, acc_t v) const {
    const auto f = forward_coef<double>(double(m), inv_std<double>(double(v), eps), double(w(c)), double(b(c)));
    slot[kMean] = m;
    slot[kScale] = acc_t(f.scale);
    slot[kShift] = acc_t(f.shift);
  }
  void forward_slots(int64_t c, acc_t* slot) const { forward_slots(c, slot, mean[c], var[c]); }

  // Backward coefficients of channel c, from the per-channel means of dz and dz * (x - mean).
  void backward_slots(int64_t c, double mean_dz, double mean_dz_xmu, acc_t* slot) const {
    forward_slots(c, slot);
    const double invstd = inv_std<double>(double(var[c]), eps);
    const auto k = backward_coef<double>(invstd, double(w(c)), training, mean_dz, mean_dz_xmu);
    slot[kDz] = acc_t(k.k_dz);
    slot[kX] = acc_t(k.k_x);
    slot[kMeanDz] = acc_t(k.mean_dz);
  }
};

// Training: batch statistics of channel c into mean/var, the running statistics' update,
// and the channel's forward coefficients.
template <typename acc_t>
struct TrainChannels {
  Channels<acc_t> ch;
  acc_t *mean, *var, *running_mean, *running_var;
  double factor;
  TrainChannels(const TrainArgs& a, double factor_)
      : ch(a), mean(ptr<acc_t>(a.mean)), var(ptr<acc_t>(a.var)), running_mean(ptr<acc_t>(a.running_mean)),
        running_var(ptr<acc_t>(a.running_var)), factor(factor_) {}
  void finish(int64_t c, const Moments<double>& m, acc_t* slot) const {
    const double v = biased_var(m);
    mean[c] = acc_t(m.mean);
    var[c] = acc_t(v);
    if (running_mean) running_mean[c] = acc_t(running_mean_update<double>(running_mean[c], m.mean, factor));
    if (running_var) running_var[c] = acc_t(running_var_update<double>(running_var[c], v, m.count, factor));
    ch.forward_slots(c, slot, mean[c], var[c]);
  }
};

int64_t threads() { return std::max<int64_t>(1, at::get_num_threads()); }

// Planar: one thread owns whole channels when there are enough of them to share.
bool owns_channels(const Layout& L) { return L.C >= 4 * threads() || L.count() <= kBlock; }

// at::parallel_for for loops that write outputs: a fence after each thread's part makes its
// streaming stores visible before the loop returns.
template <typename F>
void parallel_write(int64_t begin, int64_t end, int64_t grain, const F& f) {
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    f(b, e);
    stream_fence();
  });
}

int64_t grain_for(int64_t values_per_item) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(1, values_per_item)); }

// The coefficients of a row group by position, from per-channel slots [C][kSlots]: the
// first `used` slots (the order of Slot puts each pass's slots first).
template <typename acc_t>
struct RepeatedSlots {
  PositionTable<acc_t> table;
  Repeated<acc_t> cf;
  RepeatedSlots(const RowGroups& G, int64_t used, const std::vector<acc_t>& slots) : table(G.width, used) {
    for (int64_t k = 0; k < used; ++k) fill_column(table, k, G, slots.data() + k, kSlots);
    cf = table.repeated({0, 1, 2, 3, 4, 5});
  }
};

// Row groups of exactly one vector step (16 channels of float32 under AVX512, or fewer
// that divide it): every step of a span sees the same coefficients, held in registers, so
// a span may cover any number of rows. One call per block of rows instead of one per row
// of a few values.
template <typename scalar_t>
struct OneStep {
  using L = Lanes<scalar_t>;
  using Vec = typename L::Vec;
  Vec v[kSlots][L::kVecs];
  OneStep(const Repeated<typename L::acc_t>& r, int used) {
    for (int k = 0; k < used; ++k) {
      for (int64_t j = 0; j < L::kVecs; ++j) v[k][j] = r.at(k, j * Vec::size());
    }
  }
  Vec at(int k, int64_t p) const {
    if constexpr (L::kVecs == 1) {
      return v[k][0];
    } else {
      return v[k][(p / Vec::size()) % L::kVecs];
    }
  }
};

// The element pass of the channels-innermost layout over rows [0, M) in nb blocks of rpb
// rows: f(offset, length, coefficients) for each span, the `used` slots of rs.
template <typename scalar_t, typename F>
void row_element_pass(const RowGroups& G, const RepeatedSlots<typename Lanes<scalar_t>::acc_t>& rs, int used,
                      int64_t M, int64_t rpb, int64_t nb, F&& f) {
  parallel_write(0, nb, grain_for(rpb * G.C), [&](int64_t b0, int64_t b1) {
    const int64_t r0 = b0 * rpb, r1 = std::min(M, b1 * rpb);
    if (G.width == Lanes<scalar_t>::kWidth) {
      f(r0 * G.C, (r1 - r0) * G.C, OneStep<scalar_t>(rs.cf, used));
    } else {
      row_spans(G, r0, r1, [&](int64_t off, int64_t len) FASTNORM_INLINE_LAMBDA { f(off, len, rs.cf); });
    }
  });
}

// ---------------------------------------------------------------------------------------
// Statistics (with an optional fused normalization) in both layouts.

// Calls finish(c, moments) once per channel after its statistics: in the thread that
// computed them when one thread owns the channel (planar), else after a parallel block
// phase. Then the element pass: planar_then(c, k0, k1) for every block of a channel, right
// after its statistics when the thread owns it; rows_then(groups, rows_per_block, blocks)
// once for the channels-innermost layout.
template <typename scalar_t, typename Finish, typename PlanarThen, typename RowsThen>
void moments_then(const NormArgs& a, Finish&& finish, PlanarThen&& planar_then, RowsThen&& rows_then) {
  using acc_t = typename Lanes<scalar_t>::acc_t;
  const Layout& L = a.layout;
  const Tensors<scalar_t> T(a);
  if (!L.channels_last) {
    const int64_t count = L.count(), nb = (count + kBlock - 1) / kBlock;
    if (owns_channels(L)) {
      parallel_write(0, L.C, grain_for(count), [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          Moments<double> m{0, 0, 0};
          for (int64_t b = 0; b < nb; ++b) {
            m = moments_merge(m, planar_block_moments(T, L, c, b * kBlock, std::min(count, (b + 1) * kBlock)));
          }
          finish(c, m);
          planar_then(c, int64_t(0), count);
        }
      });
      return;
    }
    std::vector<Moments<double>> part(L.C * nb);
    at::parallel_for(0, L.C * nb, grain_for(kBlock), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t c = t / nb, b = t % nb;
        part[t] = planar_block_moments(T, L, c, b * kBlock, std::min(count, (b + 1) * kBlock));
      }
    });
    for (int64_t c = 0; c < L.C; ++c) {
      Moments<double> m{0, 0, 0};
      for (int64_t b = 0; b < nb; ++b) m = moments_merge(m, part[c * nb + b]);
      finish(c, m);
    }
    parallel_write(0, L.C * nb, grain_for(kBlock), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t c = t / nb, b = t % nb;
        planar_then(c, b * kBlock, std::min(count, (b + 1) * kBlock));
      }
    });
    return;
  }
  const RowGroups G(L.C, Lanes<scalar_t>::kWidth);
  const int64_t M = L.count(), rpb = G.rows_per_block(M), nb = (M + rpb - 1) / rpb;
  std::vector<double> mean_part(nb * L.C), m2_part(nb * L.C);  // [blocks][C]
  at::parallel_for(0, nb, grain_for(rpb * L.C), [&](int64_t b0, int64_t b1) {
    RowScratch<acc_t> sc(G);
    for (int64_t b = b0; b < b1; ++b) {
      row_block_moments(T, G, b * rpb, std::min(M, (b + 1) * rpb), sc, &mean_part[b * L.C], &m2_part[b * L.C]);
    }
  });
  std::vector<double> counts(nb);
  for (int64_t b = 0; b < nb; ++b) counts[b] = double(std::min(M, (b + 1) * rpb) - b * rpb);
  std::vector<double> mean_c(L.C), m2_c(L.C);
  at::parallel_for(0, L.C, grain_for(nb), [&](int64_t c0, int64_t c1) {
    const double n = moments_combine<double>(counts.data(), &mean_part[c0], &m2_part[c0], nb, c1 - c0, L.C,
                                             &mean_c[c0], &m2_c[c0]);
    for (int64_t c = c0; c < c1; ++c) finish(c, Moments<double>{n, mean_c[c], m2_c[c]});
  });
  rows_then(G, rpb, nb);
}

// Forward element pass of a planar block, given channel c's slots.
template <typename scalar_t, Activation A>
void normalize_planar_block(const Tensors<scalar_t>& T, const Layout& L, int64_t c, int64_t k0, int64_t k1,
                            const typename Lanes<scalar_t>::acc_t* slot) {
  const Broadcast<typename Lanes<scalar_t>::acc_t> cf(slot);
  planar_spans(L, c, k0, k1, [&](int64_t off, int64_t len) { T.template normalize<A>(off, len, cf); });
}

template <typename scalar_t, Activation A>
void normalize_rows(const Tensors<scalar_t>& T, const RowGroups& G, int64_t M, int64_t rpb, int64_t nb,
                    const std::vector<typename Lanes<scalar_t>::acc_t>& slots) {
  const RepeatedSlots<typename Lanes<scalar_t>::acc_t> rs(G, kShift + 1, slots);
  row_element_pass<scalar_t>(G, rs, kShift + 1, M, rpb, nb,
                             [&](int64_t off, int64_t len, const auto& cf) FASTNORM_INLINE_LAMBDA {
                               T.template normalize<A>(off, len, cf);
                             });
}

double momentum_factor(const TrainArgs& a) {
  if (!a.num_batches_tracked.defined()) return a.momentum;
  int64_t* nbt = a.num_batches_tracked.data_ptr<int64_t>();
  *nbt += 1;
  return a.cumulative ? 1.0 / double(*nbt) : a.momentum;
}

template <typename scalar_t, Activation A>
void train_impl(const TrainArgs& a) {
  using acc_t = typename Lanes<scalar_t>::acc_t;
  Tensors<scalar_t> T(a);
  T.out = a.output.data_ptr<scalar_t>();
  T.stream = stream_output(T.out, a.output.nbytes());
  const TrainChannels<acc_t> channels(a, momentum_factor(a));
  std::vector<acc_t> slots(a.layout.C * kSlots);
  auto finish = [&](int64_t c, const Moments<double>& m) { channels.finish(c, m, &slots[c * kSlots]); };
  auto planar_then = [&](int64_t c, int64_t k0, int64_t k1) {
    normalize_planar_block<scalar_t, A>(T, a.layout, c, k0, k1, &slots[c * kSlots]);
  };
  auto rows_then = [&](const RowGroups& G, int64_t rpb, int64_t nb) {
    normalize_rows<scalar_t, A>(T, G, a.layout.count(), rpb, nb, slots);
  };
  moments_then<scalar_t>(a, finish, planar_then, rows_then);
}

template <typename scalar_t>
void stats_impl(const NormArgs& a) {
  using acc_t = typename Lanes<scalar_t>::acc_t;
  acc_t *mean = ptr<acc_t>(a.mean), *var = ptr<acc_t>(a.var);
  auto finish = [&](int64_t c, const Moments<double>& m) {
    mean[c] = acc_t(m.mean);
    var[c] = acc_t(biased_var(m));
  };
  moments_then<scalar_t>(
      a, finish, [](int64_t, int64_t, int64_t) {}, [](const RowGroups&, int64_t, int64_t) {});
}

template <typename scalar_t, Activation A>
void elemt_impl(const NormArgs& a, const at::Tensor& output) {
  using acc_t = typename Lanes<scalar_t>::acc_t;
  Tensors<scalar_t> T(a);
  T.out = output.data_ptr<scalar_t>();
  T.stream = stream_output(T.out, output.nbytes());
  const Layout& L = a.layout;
  std::vector<acc_t> slots(L.C * kSlots);
  const Channels<acc_t> channels(a);
  for (int64_t c = 0; c < L.C; ++c) channels.forward_slots(c, &slots[c * kSlots]);
  if (!L.channels_last) {
    const int64_t count = L.count(), nb = (count + kBlock - 1) / kBlock;
    parallel_write(0, L.C * nb, grain_for(kBlock), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t c = t / nb, b = t % nb;
        normalize_planar_block<scalar_t, A>(T, L, c, b * kBlock, std::min(count, (b + 1) * kBlock),
                                            &slots[c * kSlots]);
      }
    });
    return;
  }
  const RowGroups G(L.C, Lanes<scalar_t>::kWidth);
  const int64_t M = L.count(), rpb = G.rows_per_block(M);
  normalize_rows<scalar_t, A>(T, G, M, rpb, (M + rpb - 1) / rpb, slots);
}

// ---------------------------------------------------------------------------------------
// Backward.

// Sums of dz and dz * (x - mean) for every channel, then `finish(c, sum_dz, sum_dz_xmu)`;
// then, when `elemt` is set, the element pass with the slots finish filled in. Planar
// channels owned by one thread run both while the channel is in cache.
template <typename scalar_t, Activation A, typename Finish>
void backward_impl(const BackwardArgs& a, bool reduce, bool elemt, std::vector<typename Lanes<scalar_t>::acc_t>& slots,
                   Finish&& finish) {
  using acc_t = typename Lanes<scalar_t>::acc_t;
  constexpr int64_t KW = Lanes<scalar_t>::kWidth;
  Tensors<scalar_t> T(a);
  T.stream = stream_output(T.out != nullptr ? static_cast<const void*>(T.out) : T.dz, a.input.nbytes());
  const Layout& L = a.layout;
  auto sums_block = [&](int64_t c, int64_t k0, int64_t k1, double& s1, double& s2) {
    RegisterSums<acc_t> s;
    const Broadcast<acc_t> cf(&slots[c * kSlots]);
    planar_spans(L, c, k0, k1, [&](int64_t off, int64_t len) { T.template grad_sums<A>(off, len, cf, s); });
    s1 += s.total1();
    s2 += s.total2();
  };
  auto elemt_block = [&](int64_t c, int64_t k0, int64_t k1) {
    const Broadcast<acc_t> cf(&slots[c * kSlots]);
    planar_spans(L, c, k0, k1, [&](int64_t off, int64_t len) { T.template grad_input<A>(off, len, cf); });
  };
  if (!L.channels_last) {
    const int64_t count = L.count(), nb = (count + kBlock - 1) / kBlock;
    if (owns_channels(L)) {
      parallel_write(0, L.C, grain_for(count), [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          if (reduce) {
            double s1 = 0, s2 = 0;
            for (int64_t b = 0; b < nb; ++b) sums_block(c, b * kBlock, std::min(count, (b + 1) * kBlock), s1, s2);
            finish(c, s1, s2);
          }
          if (elemt) elemt_block(c, 0, count);
        }
      });
      return;
    }
    if (reduce) {
      std::vector<double> p1(L.C * nb, 0.0), p2(L.C * nb, 0.0);
      at::parallel_for(0, L.C * nb, grain_for(kBlock), [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t c = t / nb, b = t % nb;
          sums_block(c, b * kBlock, std::min(count, (b + 1) * kBlock), p1[t], p2[t]);
        }
      });
      for (int64_t c = 0; c < L.C; ++c) {
        double s1 = 0, s2 = 0;
        for (int64_t b = 0; b < nb; ++b) {
          s1 += p1[c * nb + b];
          s2 += p2[c * nb + b];
        }
        finish(c, s1, s2);
      }
    }
    if (elemt) {
      parallel_write(0, L.C * nb, grain_for(kBlock), [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t c = t / nb, b = t % nb;
          elemt_block(c, b * kBlock, std::min(count, (b + 1) * kBlock));
        }
      });
    }
    return;
  }
  const RowGroups G(L.C, KW);
  const int64_t M = L.count(), rpb = G.rows_per_block(M), nb = (M + rpb - 1) / rpb;
  if (reduce) {
    const RepeatedSlots<acc_t> rs(G, kSlots, slots);  // the mean is last
    std::vector<double> p1(nb * L.C), p2(nb * L.C);  // [blocks][C]
    at::parallel_for(0, nb, grain_for(rpb * L.C), [&](int64_t b0, int64_t b1) {
      RowScratch<acc_t> sc(G);
      for (int64_t b = b0; b < b1; ++b) {
        auto s = sc.start(G);
        stacked_row_spans(G, b * rpb, std::min(M, (b + 1) * rpb),
                          [&](int64_t off, int64_t len, int64_t groups, int64_t stride) {
                            T.template grad_sums<A>(off, len, rs.cf, s, groups, stride);
                          });
        sc.fold(G, &p1[b * L.C], &p2[b * L.C]);
      }
    });
    at::parallel_for(0, L.C, grain_for(nb), [&](int64_t c0, int64_t c1) {
      std::vector<double> s1(c1 - c0, 0.0), s2(c1 - c0, 0.0);
      for (int64_t b = 0; b < nb; ++b) {  // block by block: contiguous channels
        for (int64_t c = c0; c < c1; ++c) {
          s1[c - c0] += p1[b * L.C + c];
          s2[c - c0] += p2[b * L.C + c];
        }
      }
      for (int64_t c = c0; c < c1; ++c) finish(c, s1[c - c0], s2[c - c0]);
    });
  }
  if (elemt) {
    const RepeatedSlots<acc_t> rs(G, kSlots, slots);
    row_element_pass<scalar_t>(G, rs, kSlots, M, rpb, nb,
                               [&](int64_t off, int64_t len, const auto& cf) FASTNORM_INLINE_LAMBDA {
                                 T.template grad_input<A>(off, len, cf);
                               });
  }
}

// Calls f(scalar_t{}, integral_constant<Activation>) for the input dtype and activation.
template <typename F>
void dispatch(const at::Tensor& input, Activation act, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "fastnorm_batch_norm_cpu", [&] {
    with_activation(act, [&](auto A) { f(scalar_t{}, A); });
  });
}

}  // namespace

void batch_norm_stats(const NormArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.input.scalar_type(), "fastnorm_batch_norm_stats_cpu",
                                  [&] { stats_impl<scalar_t>(a); });
}

void batch_norm_train(const TrainArgs& a) {
  dispatch(a.input, a.act, [&](auto s, auto A) { train_impl<decltype(s), decltype(A)::value>(a); });
}

void batch_norm_elemt(const NormArgs& a, const at::Tensor& output) {
  dispatch(a.input, a.act, [&](auto s, auto A) { elemt_impl<decltype(s), decltype(A)::value>(a, output); });
}

void batch_norm_backward(const BackwardArgs& a) {
  dispatch(a.input, a.act, [&](auto s, auto A) {
    using scalar_t = decltype(s);
    using acc_t = typename Lanes<scalar_t>::acc_t;
    const int64_t C = a.layout.C;
    const double n = double(a.layout.count());
    Channels<acc_t> channels(a);
    channels.training = a.training;
    std::vector<acc_t> slots(C * kSlots);
    const bool want_params = a.grad_weight.defined() || a.grad_bias.defined();
    const bool want_elemt = a.grad_input.defined() || a.grad_preact.defined();
    const bool reduce = want_params || (a.training && a.grad_input.defined());
    for (int64_t c = 0; c < C; ++c) {
      if (reduce) {
        channels.forward_slots(c, &slots[c * kSlots]);  // the backward ones follow the sums
      } else {
        channels.backward_slots(c, 0.0, 0.0, &slots[c * kSlots]);
      }
    }
    acc_t *gw = ptr<acc_t>(a.grad_weight), *gb = ptr<acc_t>(a.grad_bias);
    backward_impl<scalar_t, decltype(A)::value>(a, reduce, want_elemt, slots, [&](int64_t c, double s1, double s2) {
      if (gw) gw[c] = acc_t(grad_weight_from_sums(s2, inv_std<double>(double(channels.var[c]), a.eps)));
      if (gb) gb[c] = acc_t(s1);
      channels.backward_slots(c, s1 / n, s2 / n, &slots[c * kSlots]);
    });
  });
}

void batch_norm_backward_reduce(const BackwardArgs& a) {
  dispatch(a.input, a.act, [&](auto s, auto A) {
    using acc_t = typename Lanes<decltype(s)>::acc_t;
    const Channels<acc_t> channels(a);
    std::vector<acc_t> slots(a.layout.C * kSlots);
    for (int64_t c = 0; c < a.layout.C; ++c) channels.forward_slots(c, &slots[c * kSlots]);
    acc_t *sum_dz = ptr<acc_t>(a.sum_dz), *sum_dz_xmu = ptr<acc_t>(a.sum_dz_xmu);
    backward_impl<decltype(s), decltype(A)::value>(a, true, false, slots, [&](int64_t c, double s1, double s2) {
      sum_dz[c] = acc_t(s1);
      sum_dz_xmu[c] = acc_t(s2);
    });
  });
}

void batch_norm_backward_elemt(const BackwardArgs& a) {
  dispatch(a.input, a.act, [&](auto s, auto A) {
    using acc_t = typename Lanes<decltype(s)>::acc_t;
    const Channels<acc_t> channels(a);
    std::vector<acc_t> slots(a.layout.C * kSlots);
    const acc_t *mean_dz = ptr<acc_t>(a.mean_dz), *mean_dz_xmu = ptr<acc_t>(a.mean_dz_xmu);
    for (int64_t c = 0; c < a.layout.C; ++c) {
      channels.backward_slots(c, double(mean_dz[c]), double(mean_dz_xmu[c]), &slots[c * kSlots]);
    }
    backward_impl<decltype(s), decltype(A)::value>(a, false, true, slots, [](int64_t, double, double) {});
  });
}

}  // namespace fastnorm::cpu
