// Batch-norm CUDA kernels.
//
// A training forward is two launches: a reduction that computes every channel's
// statistics (partial results per block, merged by the last block of each channel without
// a second launch) and writes the per-channel coefficients, then an element-wise pass. The
// backward is the same with the two gradient sums. (When a channel's values fit in shared
// memory, batch_norm_on_chip.cuh does either in one launch and one read.) Loads and stores are 16 bytes wide
// where the pointers allow; the per-element math and the merges are the CPU's
// (common/batch_norm_math.h).
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

#include "common/batch_norm_math.h"
#include "cuda/cuda_utils.cuh"

namespace fastnorm {

// Warp shuffle of a Moments (in Moments' namespace, for warp_reduce to find it).
template <typename T>
__device__ __forceinline__ Moments<T> shfl_xor(const Moments<T>& m, int mask) {
  return {__shfl_xor_sync(0xffffffffu, m.count, mask), __shfl_xor_sync(0xffffffffu, m.mean, mask),
          __shfl_xor_sync(0xffffffffu, m.m2, mask)};
}

}  // namespace fastnorm

namespace fastnorm::cuda {

constexpr int kThreads = 256;  // every kernel's block size

// ---------------------------------------------------------------------------------------
// Reduction states.

template <typename T>
struct Sums {
  T a, b;
};

template <typename T>
__device__ __forceinline__ Sums<T> shfl_xor(const Sums<T>& s, int mask) {
  return {__shfl_xor_sync(0xffffffffu, s.a, mask), __shfl_xor_sync(0xffffffffu, s.b, mask)};
}

// Reads a partial written by another block (bypassing L1).
template <typename T>
__device__ __forceinline__ Moments<T> load_partial(const Moments<T>* p) {
  return {__ldcg(&p->count), __ldcg(&p->mean), __ldcg(&p->m2)};
}
template <typename T>
__device__ __forceinline__ Sums<T> load_partial(const Sums<T>* p) {
  return {__ldcg(&p->a), __ldcg(&p->b)};
}

// Per-channel coefficients, computed once per channel (by a reduction's last block or by
// coef_kernel) and read by the element-wise kernels.
template <typename acc_t>
struct ChannelCoef {
  acc_t scale, shift;      // z = x * scale + shift
  acc_t k_dz, k_x, mean_dz;  // grad input = (dz - mean_dz) * k_dz + (x - mean) * k_x
  acc_t mean;              // for the sums of dz * (x - mean)
};

// What every kernel reads of the per-channel inputs.
template <typename acc_t>
struct ChannelInputs {
  const acc_t* weight;  // may be null (1)
  const acc_t* bias;    // may be null (0)
  const acc_t* mean;
  const acc_t* var;
  double eps;
  __device__ __forceinline__ acc_t w(int64_t c) const { return weight ? weight[c] : acc_t(1); }
  __device__ __forceinline__ acc_t b(int64_t c) const { return bias ? bias[c] : acc_t(0); }

  // The forward coefficients (and mean) of channel c from the given mean and var.
  __device__ __forceinline__ ChannelCoef<acc_t> forward(int64_t c, acc_t m, acc_t v) const {
    const acc_t invstd = inv_std<acc_t>(v, eps);
    const auto f = forward_coef<acc_t>(m, invstd, w(c), b(c));
    return {f.scale, f.shift, acc_t(0), acc_t(0), acc_t(0), m};
  }
  // Forward and backward coefficients from the per-channel means of dz and dz * (x - mean).
  __device__ __forceinline__ ChannelCoef<acc_t> backward(int64_t c, bool training, acc_t mean_dz,
                                                         acc_t mean_dz_xmu) const {
    ChannelCoef<acc_t> k = forward(c, mean[c], var[c]);
    const auto g = backward_coef<acc_t>(inv_std<acc_t>(var[c], eps), w(c), training, mean_dz, mean_dz_xmu);
    k.k_dz = g.k_dz;
    k.k_x = g.k_x;
    k.mean_dz = g.mean_dz;
    return k;
  }
};

// Coefficients of every channel from given statistics, for the element-wise passes that
// follow no reduction: the forward in evaluation (backward false), the backward in
// evaluation (training false) and the synchronized batch norm's (given mean_dz and
// mean_dz_xmu).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    coef_kernel(ChannelInputs<acc_t> in, bool backward, bool training, const acc_t* mean_dz, const acc_t* mean_dz_xmu,
                int64_t C, ChannelCoef<acc_t>* coef) {
  for (int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; c < C; c += int64_t(gridDim.x) * blockDim.x) {
    if (!backward) {
      coef[c] = in.forward(c, in.mean[c], in.var[c]);
    } else {
      coef[c] = in.backward(c, training, mean_dz ? mean_dz[c] : acc_t(0), mean_dz_xmu ? mean_dz_xmu[c] : acc_t(0));
    }
  }
}

// ---------------------------------------------------------------------------------------
// What a reduction accumulates. Each op sees the values of one channel, several at a time.

// Statistics: Welford moments; a batch of values merges as one set (two-pass on the batch).
template <typename scalar_t, typename acc_t>
struct StatsOp {
  using State = Moments<acc_t>;
  const scalar_t* __restrict__ x;

  __device__ __forceinline__ ChannelCoef<acc_t> channel(int64_t) const { return {}; }

  static __device__ __forceinline__ State identity() { return {acc_t(0), acc_t(0), acc_t(0)}; }
  static __device__ __forceinline__ State merge(const State& a, const State& b) { return moments_merge(a, b); }

  // Values x[off + e] for the lanes e in [lo, hi) of a batch of N.
  template <int N>
  __device__ __forceinline__ void add(State& s, const Pack<scalar_t, N>& xs, int lo, int hi, const ChannelCoef<acc_t>&) const {
    acc_t sum = 0;
#pragma unroll
    for (int e = 0; e < N; ++e) sum += (e >= lo && e < hi) ? acc_t(xs.v[e]) : acc_t(0);
    const acc_t n = acc_t(hi - lo);
    if (n == acc_t(0)) return;
    const acc_t mean = fn_div(sum, n);
    acc_t m2 = 0;
#pragma unroll
    for (int e = 0; e < N; ++e) {
      const acc_t d = acc_t(xs.v[e]) - mean;
      m2 += (e >= lo && e < hi) ? d * d : acc_t(0);
    }
    s = moments_merge(s, State{n, mean, m2});
  }
};

// Backward: the sums of dz and dz * (x - mean), dz the gradient at the pre-activation.
template <typename scalar_t, typename acc_t, Activation A>
struct GradOp {
  using State = Sums<acc_t>;
  const scalar_t* __restrict__ x;
  const scalar_t* __restrict__ dy;
  const scalar_t* __restrict__ v;  // the output y, or the residual when z is recomputed (may be null)
  bool needs_z;
  acc_t slope;
  ChannelInputs<acc_t> in;  // mean, var, weight, bias of the forward

  // The forward coefficients (z = x * scale + shift) and mean of channel c.
  __device__ __forceinline__ ChannelCoef<acc_t> channel(int64_t c) const { return in.forward(c, in.mean[c], in.var[c]); }

  static __device__ __forceinline__ State identity() { return {acc_t(0), acc_t(0)}; }
  static __device__ __forceinline__ State merge(const State& a, const State& b) { return {a.a + b.a, a.b + b.b}; }

  __device__ __forceinline__ acc_t grad_preact(acc_t dyv, acc_t xv, acc_t vv, const ChannelCoef<acc_t>& k) const {
    if constexpr (A == Activation::None) {
      return dyv;
    } else {
      const acc_t u = needs_z ? xv * k.scale + k.shift + vv : vv;
      return activation_backward<acc_t>(dyv, u, A, slope);
    }
  }
  // Adds one value's dz and dz * (x - mean) to the sums; returns dz.
  __device__ __forceinline__ acc_t accumulate(State& s, acc_t dyv, acc_t xv, acc_t vv,
                                              const ChannelCoef<acc_t>& k) const {
    const acc_t dz = grad_preact(dyv, xv, vv, k);
    s.a += dz;
    s.b += dz * (xv - k.mean);
    return dz;
  }
};

// One output value of the forward: act(x * scale + shift (+ residual)).
template <typename acc_t, Activation A>
__device__ __forceinline__ acc_t forward_value(const ChannelCoef<acc_t>& k, acc_t xv, bool has_res, acc_t rv,
                                               acc_t slope) {
  acc_t z = xv * k.scale + k.shift;
  if (has_res) z += rv;
  return activate<acc_t>(z, A, slope);
}

// One value of the input gradient from dz, the gradient at the pre-activation. Evaluation's
// coefficients (k_x = mean_dz = 0) leave x out, so that a non-finite x keeps its gradient
// finite, as torch's; in training a zero k_x comes only with finite statistics.
template <typename acc_t>
__device__ __forceinline__ acc_t grad_input_value(const ChannelCoef<acc_t>& k, acc_t dz, acc_t xv) {
  return k.k_x == acc_t(0) ? (dz - k.mean_dz) * k.k_dz : (dz - k.mean_dz) * k.k_dz + (xv - k.mean) * k.k_x;
}

// ---------------------------------------------------------------------------------------
// Reductions over channels.

// The last block of a channel (or channel tile) to finish: counters[i] counts finished
// blocks and wraps to 0 after `blocks` (atomicInc), so it needs no reset between calls.
__device__ __forceinline__ bool last_block_done(unsigned int* counter, unsigned int blocks) {
  __shared__ bool last;
  __threadfence();  // this block's partial is visible before it is counted
  __syncthreads();
  if (thread_rank() == 0) last = atomicInc(counter, blocks - 1) == blocks - 1;
  __syncthreads();
  if (last) __threadfence();  // and the other blocks' partials are read after their count
  return last;
}

// Planar (N, C, S): blockIdx.x is the channel, blockIdx.y one of `splits` parts of its N
// planes (so that blocks, launched x first, read the tensor front to back one part after
// another when the planes are split: see the element-wise passes). Each plane is read
// as the VEC-wide packs that cover it (lanes outside masked), `slots` packs per plane.
// Partials go to ws[c * splits + split]; the channel's last block merges them and calls
// finish(c, total).
template <int VEC, typename scalar_t, typename Op, typename Finish>
__global__ void __launch_bounds__(kThreads)
    reduce_planar_kernel(Op op, Finish finish, int64_t C, int64_t S, int64_t numel, uint32_t items,
                         uint32_t items_per_split, at::cuda::detail::IntDivider<uint32_t> div_slots,
                         typename Op::State* ws, unsigned int* counters) {
  using State = typename Op::State;
  __shared__ State shared[kWarpSize];
  const int splits = gridDim.y, split = blockIdx.y;
  const uint32_t begin = split * items_per_split, end = min(items, begin + items_per_split);
  for (int64_t c = blockIdx.x; c < C; c += gridDim.x) {
    const auto k = op.channel(c);
    State s = Op::identity();
    for (uint32_t it = begin + thread_rank(); it < end; it += block_size()) {
      const auto q = div_slots.divmod(it);
      const int64_t start = (int64_t(q.div) * C + c) * S;  // the plane's first value
      const int64_t first = (start / VEC + q.mod) * VEC;
      if (first >= start + S) continue;
      const int lo = start > first ? int(start - first) : 0;
      const int hi = start + S - first < VEC ? int(start + S - first) : VEC;
      // The tensor's last pack may end past its last value: read that one lane by lane.
      op.template add<VEC>(s, first, lo, hi, k, first + VEC <= numel);
    }
    s = block_reduce(s, Op::merge, Op::identity(), shared);
    if (thread_rank() == 0) ws[c * splits + split] = s;
    if (!last_block_done(&counters[c], splits)) continue;
    State t = Op::identity();
    for (int i = thread_rank(); i < splits; i += block_size()) t = Op::merge(t, load_partial(&ws[c * splits + i]));
    t = block_reduce(t, Op::merge, Op::identity(), shared);
    if (thread_rank() == 0) finish(c, t);
  }
}

// Merges the states s[VEC] of the block's threads (tx, ty) over ty, in shared memory
// ([TY][TX][VEC], TY a power of two): the totals are left at smem[tx * VEC + e].
template <typename Op, int VEC, typename State = typename Op::State>
__device__ __forceinline__ void merge_over_ty(const State (&s)[VEC], State* smem, int TX, int TY, int tx, int ty) {
#pragma unroll
  for (int e = 0; e < VEC; ++e) smem[(ty * TX + tx) * VEC + e] = s[e];
  __syncthreads();
  for (int stride = TY / 2; stride > 0; stride /= 2) {
    if (ty < stride) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        State& a = smem[(ty * TX + tx) * VEC + e];
        a = Op::merge(a, smem[((ty + stride) * TX + tx) * VEC + e]);
      }
    }
    __syncthreads();
  }
}

// Channels innermost, M rows of C: blockIdx.x is a tile of TX * VEC channels, blockIdx.y
// one of `splits` parts of the rows (front to back, as above); thread (tx, ty) holds the
// states of VEC channels over rows ty, ty + TY, ... Partials go to ws[split * C + c]; a
// tile's last block merges them the same way, thread (tx, ty) over partials ty, ty + TY, ...
// then a tree over ty: TY partials in flight at a time. (One thread to a channel walking
// every partial in turn cost about 0.3 us a partial on an H200: 80-160 us of a 25 MB
// channels_last forward, where the tile held every channel and the rows took 500 splits.)
template <int VEC, typename scalar_t, typename Op, typename Finish>
__global__ void __launch_bounds__(kThreads)
    reduce_rows_kernel(Op op, Finish finish, int64_t M, int64_t C, int64_t rows_per_split, typename Op::State* ws,
                       unsigned int* counters) {
  using State = typename Op::State;
  using acc_t = typename Finish::acc_t;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  State* smem = reinterpret_cast<State*>(smem_raw);  // [blockDim.y][blockDim.x * VEC]
  const int TX = blockDim.x, TY = blockDim.y, tx = threadIdx.x, ty = threadIdx.y;
  const int splits = gridDim.y, split = blockIdx.y;
  const int64_t c0 = (int64_t(blockIdx.x) * TX + tx) * VEC;
  const int lanes = c0 < C ? VEC : 0;  // VEC > 1 only when C % VEC == 0
  ChannelCoef<acc_t> k[VEC];
  State s[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    k[e] = e < lanes ? op.channel(c0 + e) : ChannelCoef<acc_t>{};
    s[e] = Op::identity();
  }
  const int64_t r0 = split * rows_per_split, r1 = r0 + rows_per_split < M ? r0 + rows_per_split : M;
  // Several rows' loads in flight per thread (float64's registers only hold one row's).
  constexpr int kRowsInFlight = sizeof(acc_t) == 8 ? 1 : 4;
  if (lanes > 0) {
#pragma unroll kRowsInFlight
    for (int64_t r = r0 + ty; r < r1; r += TY) op.template add_row<VEC>(s, r * C + c0, k);
  }
  merge_over_ty<Op, VEC>(s, smem, TX, TY, tx, ty);
  if (ty == 0) {
    for (int e = 0; e < lanes; ++e) ws[split * C + c0 + e] = smem[tx * VEC + e];
  }
  if (!last_block_done(&counters[blockIdx.x], splits)) return;
  // smem was last read (above) before last_block_done's barrier.
#pragma unroll
  for (int e = 0; e < VEC; ++e) s[e] = Op::identity();
  if (lanes > 0) {
    for (int j = ty; j < splits; j += TY) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) s[e] = Op::merge(s[e], load_partial(&ws[int64_t(j) * C + c0 + e]));
    }
  }
  merge_over_ty<Op, VEC>(s, smem, TX, TY, tx, ty);
  if (ty < lanes) finish(c0 + ty, smem[tx * VEC + ty]);  // a channel to a thread (TY >= 8 >= VEC)
}

// ---------------------------------------------------------------------------------------
// The reductions' element access: the planar kernel hands a pack and its valid lanes, the
// rows kernel a row's VEC channels.

// The pack at p, or (whole == false) only its lanes [lo, hi), the rest zero.
template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_lanes(const T* p, int lo, int hi, bool whole) {
  if (whole) return load_pack<N>(p);
  Pack<T, N> r;
#pragma unroll
  for (int e = 0; e < N; ++e) r.v[e] = (e >= lo && e < hi) ? p[e] : T(0);
  return r;
}

template <typename scalar_t, typename acc_t>
struct StatsReduce : StatsOp<scalar_t, acc_t> {
  template <int N>
  __device__ __forceinline__ void add(Moments<acc_t>& s, int64_t first, int lo, int hi, const ChannelCoef<acc_t>& k,
                                      bool whole) const {
    StatsOp<scalar_t, acc_t>::template add<N>(s, load_lanes<N>(this->x + first, lo, hi, whole), lo, hi, k);
  }
  // One row: a Welford step for each of N channels (one division for all of them).
  template <int N>
  __device__ __forceinline__ void add_row(Moments<acc_t> (&s)[N], int64_t off, const ChannelCoef<acc_t> (&)[N]) const {
    const auto xs = load_pack<N>(this->x + off);
    const acc_t n = s[0].count + acc_t(1), inv = fn_div(acc_t(1), n);
#pragma unroll
    for (int e = 0; e < N; ++e) {
      const acc_t v = acc_t(xs.v[e]), d = v - s[e].mean;
      s[e].count = n;
      s[e].mean += d * inv;
      s[e].m2 += d * (v - s[e].mean);
    }
  }
};

template <typename scalar_t, typename acc_t, Activation A>
struct GradReduce : GradOp<scalar_t, acc_t, A> {
  using Base = GradOp<scalar_t, acc_t, A>;
  template <int N>
  __device__ __forceinline__ void add(Sums<acc_t>& s, int64_t first, int lo, int hi, const ChannelCoef<acc_t>& k,
                                      bool whole) const {
    const auto xs = load_lanes<N>(this->x + first, lo, hi, whole);
    const auto dys = load_lanes<N>(this->dy + first, lo, hi, whole);
    Pack<scalar_t, N> vs;
    if (this->v) vs = load_lanes<N>(this->v + first, lo, hi, whole);
#pragma unroll
    for (int e = 0; e < N; ++e) {
      const acc_t xv = acc_t(xs.v[e]);
      const acc_t dz = Base::grad_preact(acc_t(dys.v[e]), xv, this->v ? acc_t(vs.v[e]) : acc_t(0), k);
      const bool in = e >= lo && e < hi;
      s.a += in ? dz : acc_t(0);
      s.b += in ? dz * (xv - k.mean) : acc_t(0);
    }
  }
  template <int N>
  __device__ __forceinline__ void add_row(Sums<acc_t> (&s)[N], int64_t off, const ChannelCoef<acc_t> (&k)[N]) const {
    const auto xs = load_pack<N>(this->x + off);
    const auto dys = load_pack<N>(this->dy + off);
    Pack<scalar_t, N> vs;
    if (this->v) vs = load_pack<N>(this->v + off);
#pragma unroll
    for (int e = 0; e < N; ++e) {
      Base::accumulate(s[e], acc_t(dys.v[e]), acc_t(xs.v[e]), this->v ? acc_t(vs.v[e]) : acc_t(0), k[e]);
    }
  }
};

// ---------------------------------------------------------------------------------------
// What the last block does with a channel's total.

// Training forward: statistics, running statistics, forward coefficients.
template <typename T>
struct TrainFinish {
  using acc_t = T;
  ChannelInputs<acc_t> in;  // weight, bias, eps (mean/var unused)
  acc_t* save_mean;
  acc_t* save_var;
  acc_t* running_mean;  // may be null
  acc_t* running_var;
  const int64_t* num_batches_tracked;  // may be null; read here, incremented once every channel has read it
  double momentum;
  bool cumulative;
  ChannelCoef<acc_t>* coef;

  __device__ __forceinline__ void operator()(int64_t c, const Moments<acc_t>& m) const {
    const acc_t var = biased_var(m);
    save_mean[c] = m.mean;
    save_var[c] = var;
    if (running_mean) {
      acc_t factor = acc_t(momentum);
      if (num_batches_tracked && cumulative) factor = fn_div(acc_t(1), acc_t(*num_batches_tracked + 1));
      running_mean[c] = running_mean_update<acc_t>(running_mean[c], m.mean, factor);
      running_var[c] = running_var_update<acc_t>(running_var[c], var, m.count, factor);
    }
    coef[c] = in.forward(c, m.mean, var);
  }
};

// Statistics only (synchronized batch norm).
template <typename T>
struct StatsFinish {
  using acc_t = T;
  acc_t* mean;
  acc_t* var;
  __device__ __forceinline__ void operator()(int64_t c, const Moments<acc_t>& m) const {
    mean[c] = m.mean;
    var[c] = biased_var(m);
  }
};

// Fused backward: parameter gradients and the element pass's coefficients.
template <typename T>
struct GradFinish {
  using acc_t = T;
  ChannelInputs<acc_t> in;
  bool training;
  acc_t count;
  acc_t* grad_weight;  // may be null
  acc_t* grad_bias;
  ChannelCoef<acc_t>* coef;
  __device__ __forceinline__ void operator()(int64_t c, const Sums<acc_t>& s) const {
    if (grad_weight) grad_weight[c] = grad_weight_from_sums(s.b, inv_std<acc_t>(in.var[c], in.eps));
    if (grad_bias) grad_bias[c] = s.a;
    coef[c] = in.backward(c, training, fn_div(s.a, count), fn_div(s.b, count));
  }
};

// The two sums only (synchronized batch norm).
template <typename T>
struct SumsFinish {
  using acc_t = T;
  acc_t* sum_dz;
  acc_t* sum_dz_xmu;
  __device__ __forceinline__ void operator()(int64_t c, const Sums<acc_t>& s) const {
    sum_dz[c] = s.a;
    sum_dz_xmu[c] = s.b;
  }
};

// ---------------------------------------------------------------------------------------
// Element-wise passes over a chunk of the flat tensor (pointers at the chunk's start):
// VEC values per thread and step, each value's channel from a ChannelWalk. A scalar tail
// covers numel % VEC. They walk the tensor back to front: the reduction before them read
// it front to back, so their first reads find what L2 still holds of its last ones (a
// front-to-back walk would evict those lines before reaching them).

// The coefficients of the channels that a thread's VEC pack slots held last, read again only
// when a slot's channel changes: channels innermost, a slot keeps its channel from one step
// to the next whenever the grid's stride (blocks * kThreads * VEC values) is a multiple of
// C, as for power-of-two channel counts. Planar, the stride usually passes a plane, and the
// cache only saves the reads within a step. (Read per value,
// channels innermost, a warp's loads spread over kilobytes of coefficients: on an H200 the
// bfloat16 normalize took 54 us for 25 MB, 3x the float32 one for the same bytes.)
template <int VEC, typename acc_t>
struct CoefCache {
  const ChannelCoef<acc_t>* __restrict__ coef;
  ChannelCoef<acc_t> k[VEC];
  uint32_t c[VEC];
  __device__ __forceinline__ explicit CoefCache(const ChannelCoef<acc_t>* p) : coef(p) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) c[e] = UINT32_MAX;
  }
  __device__ __forceinline__ const ChannelCoef<acc_t>& at(int e, uint32_t channel) {
    if (channel != c[e]) {
      c[e] = channel;
      k[e] = coef[channel];
    }
    return k[e];
  }
};

// out = act(x * scale + shift (+ residual)).
template <int VEC, typename scalar_t, typename acc_t, Activation A>
__global__ void __launch_bounds__(kThreads)
    normalize_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ res, scalar_t* __restrict__ out,
                     uint32_t numel, ChannelWalk walk, const ChannelCoef<acc_t>* __restrict__ coef, acc_t slope,
                     int64_t* num_batches_tracked) {
  using index_t = uint32_t;
  const index_t tid = index_t(blockIdx.x) * blockDim.x + threadIdx.x, stride = index_t(gridDim.x) * blockDim.x;
  if (num_batches_tracked && tid == 0) *num_batches_tracked += 1;  // after the statistics' reads
  const index_t packs = numel / VEC;
  CoefCache<VEC, acc_t> cache(coef);
  for (index_t p = tid; p < packs; p += stride) {
    const index_t i0 = (packs - 1 - p) * VEC;
    auto pos = walk.at(i0);
    const auto xs = load_pack<VEC>(x + i0);
    Pack<scalar_t, VEC> rs, ys;
    if (res) rs = load_pack<VEC>(res + i0);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      ys.v[e] = scalar_t(forward_value<acc_t, A>(cache.at(e, pos.c), acc_t(xs.v[e]), res != nullptr,
                                                 res ? acc_t(rs.v[e]) : acc_t(0), slope));
      walk.next(pos);
    }
    store_pack<VEC>(out + i0, ys);
  }
  for (index_t i = packs * VEC + tid; i < numel; i += stride) {
    out[i] = scalar_t(forward_value<acc_t, A>(coef[walk.at(i).c], acc_t(x[i]), res != nullptr,
                                              res ? acc_t(res[i]) : acc_t(0), slope));
  }
}

// grad input = (dz - mean_dz) * k_dz + (x - mean) * k_x, and dz itself (the residual's gradient).
template <int VEC, typename scalar_t, typename acc_t, Activation A>
__global__ void __launch_bounds__(kThreads)
    grad_input_kernel(GradOp<scalar_t, acc_t, A> op, scalar_t* __restrict__ dx, scalar_t* __restrict__ dz_out,
                      uint32_t numel, ChannelWalk walk, const ChannelCoef<acc_t>* __restrict__ coef) {
  using index_t = uint32_t;
  const index_t tid = index_t(blockIdx.x) * blockDim.x + threadIdx.x, stride = index_t(gridDim.x) * blockDim.x;
  const index_t packs = numel / VEC;
  CoefCache<VEC, acc_t> cache(coef);
  for (index_t p = tid; p < packs; p += stride) {
    const index_t i0 = (packs - 1 - p) * VEC;
    auto pos = walk.at(i0);
    const auto xs = load_pack<VEC>(op.x + i0);
    const auto dys = load_pack<VEC>(op.dy + i0);
    Pack<scalar_t, VEC> vs, gx, gz;
    if (op.v) vs = load_pack<VEC>(op.v + i0);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const ChannelCoef<acc_t>& k = cache.at(e, pos.c);
      const acc_t xv = acc_t(xs.v[e]);
      const acc_t dz = op.grad_preact(acc_t(dys.v[e]), xv, op.v ? acc_t(vs.v[e]) : acc_t(0), k);
      gz.v[e] = scalar_t(dz);
      gx.v[e] = scalar_t(grad_input_value(k, dz, xv));
      walk.next(pos);
    }
    if (dx) store_pack<VEC>(dx + i0, gx);
    if (dz_out) store_pack<VEC>(dz_out + i0, gz);
  }
  for (index_t i = packs * VEC + tid; i < numel; i += stride) {
    const ChannelCoef<acc_t>& k = coef[walk.at(i).c];
    const acc_t xv = acc_t(op.x[i]);
    const acc_t dz = op.grad_preact(acc_t(op.dy[i]), xv, op.v ? acc_t(op.v[i]) : acc_t(0), k);
    if (dz_out) dz_out[i] = scalar_t(dz);
    if (dx) dx[i] = scalar_t(grad_input_value(k, dz, xv));
  }
}

}  // namespace fastnorm::cuda
