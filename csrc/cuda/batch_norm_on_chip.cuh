// Batch-norm CUDA kernels that hold each channel's values on chip.
//
// For a planar (N, C, S) tensor (float32, float16, bfloat16) whose channel slab (N planes
// of S values) fits in shared memory, one block per channel (blockIdx.x) reads the slab
// once into shared memory, reduces it, and writes the result from the shared copy: the
// training forward reads x once instead of twice, the training backward reads x and dy
// once instead of twice. Each thread re-reads only the packs it stored itself, so the
// copy needs no barrier of its own. The copy comes first, its loads unrolled so that many
// are in flight per thread (they do not wait on the arithmetic), then the reduction from
// shared memory. The per-value math and the merges are those of batch_norm_kernels.cuh.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

#include "cuda/batch_norm_kernels.cuh"

namespace fastnorm::cuda {

// Where pack p (of VEC values) of channel c's slab lies in the tensor: plane p / (S / VEC),
// pack p % (S / VEC) within it. S % VEC == 0.
template <int VEC>
struct SlabWalk {
  int64_t C, S;
  at::cuda::detail::IntDivider<uint32_t> div_packs;  // packs per plane
  __device__ __forceinline__ int64_t offset(int64_t c, uint32_t p) const {
    const auto q = div_packs.divmod(p);
    return (int64_t(q.div) * C + c) * S + int64_t(q.mod) * VEC;
  }
};

// The block's total of the threads' states s, given to finish(c, total) by thread 0; returns
// the coefficients finish wrote for channel c, in every thread.
template <typename Op, typename Finish>
__device__ __forceinline__ ChannelCoef<typename Finish::acc_t> finish_channel(typename Op::State s, int64_t c,
                                                                              const Finish& finish,
                                                                              typename Op::State* shared) {
  __shared__ ChannelCoef<typename Finish::acc_t> coef;
  s = block_reduce(s, Op::merge, Op::identity(), shared);
  if (thread_rank() == 0) {
    finish(c, s);
    coef = finish.coef[c];
  }
  __syncthreads();
  return coef;
}

// Training forward: statistics, running statistics and coefficients (finish), the output,
// and num_batches_tracked incremented by the last block once every block has read it.
// Dynamic shared memory: the slab, `packs` packs.
template <int VEC, typename scalar_t, typename acc_t, Activation A>
__global__ void __launch_bounds__(kThreads)
    train_on_chip_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ res,
                         scalar_t* __restrict__ out, SlabWalk<VEC> walk, uint32_t packs, TrainFinish<acc_t> finish,
                         acc_t slope, int64_t* num_batches_tracked, unsigned int* counter) {
  using P = Pack<scalar_t, VEC>;
  using Op = StatsOp<scalar_t, acc_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  P* slab = reinterpret_cast<P*>(smem_raw);
  __shared__ Moments<acc_t> shared[kWarpSize];
  const Op op{x};
  const int t = thread_rank();
  const int64_t c = blockIdx.x;
#pragma unroll 8
  for (uint32_t p = t; p < packs; p += kThreads) slab[p] = load_pack<VEC>(x + walk.offset(c, p));
  typename Op::State s = Op::identity();
  for (uint32_t p = t; p < packs; p += kThreads) op.template add<VEC>(s, slab[p], 0, VEC, ChannelCoef<acc_t>{});
  const ChannelCoef<acc_t> k = finish_channel<Op>(s, c, finish, shared);
#pragma unroll 4
  for (uint32_t p = t; p < packs; p += kThreads) {  // (unrolled: the residual's loads in flight together)
    const int64_t off = walk.offset(c, p);
    const P xs = slab[p];
    P rs, ys;
    if (res) rs = load_pack<VEC>(res + off);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      ys.v[e] = scalar_t(forward_value<acc_t, A>(k, acc_t(xs.v[e]), res != nullptr,
                                                 res ? acc_t(rs.v[e]) : acc_t(0), slope));
    }
    store_pack<VEC>(out + off, ys);
  }
  if (num_batches_tracked && last_block_done(counter, gridDim.x) && t == 0) *num_batches_tracked += 1;
}

// Training backward (or evaluation backward with parameter gradients): the two sums, the
// parameter gradients and coefficients (finish), then grad input and dz. Dynamic shared
// memory: the slabs of x, dy and (when op.v) v, `packs` packs each.
template <int VEC, typename scalar_t, typename acc_t, Activation A>
__global__ void __launch_bounds__(kThreads)
    backward_on_chip_kernel(GradOp<scalar_t, acc_t, A> op, scalar_t* __restrict__ dx, scalar_t* __restrict__ dz_out,
                            SlabWalk<VEC> walk, uint32_t packs, GradFinish<acc_t> finish) {
  using P = Pack<scalar_t, VEC>;
  using Op = GradOp<scalar_t, acc_t, A>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  P* x_slab = reinterpret_cast<P*>(smem_raw);
  P* dy_slab = x_slab + packs;
  P* v_slab = dy_slab + packs;  // used when op.v
  __shared__ Sums<acc_t> shared[kWarpSize];
  const int t = thread_rank();
  const int64_t c = blockIdx.x;
  const ChannelCoef<acc_t> kf = op.channel(c);
#pragma unroll 4
  for (uint32_t p = t; p < packs; p += kThreads) {
    const int64_t off = walk.offset(c, p);
    x_slab[p] = load_pack<VEC>(op.x + off);
    dy_slab[p] = load_pack<VEC>(op.dy + off);
    if (op.v) v_slab[p] = load_pack<VEC>(op.v + off);
  }
  typename Op::State s = Op::identity();
  for (uint32_t p = t; p < packs; p += kThreads) {
    const P xs = x_slab[p], dys = dy_slab[p];
    P vs;
    if (op.v) vs = v_slab[p];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      op.accumulate(s, acc_t(dys.v[e]), acc_t(xs.v[e]), op.v ? acc_t(vs.v[e]) : acc_t(0), kf);
    }
  }
  const ChannelCoef<acc_t> k = finish_channel<Op>(s, c, finish, shared);
  for (uint32_t p = t; p < packs; p += kThreads) {
    const int64_t off = walk.offset(c, p);
    const P xs = x_slab[p], dys = dy_slab[p];
    P vs, gx, gz;
    if (op.v) vs = v_slab[p];
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const acc_t xv = acc_t(xs.v[e]);
      const acc_t dz = op.grad_preact(acc_t(dys.v[e]), xv, op.v ? acc_t(vs.v[e]) : acc_t(0), k);
      gz.v[e] = scalar_t(dz);
      gx.v[e] = scalar_t(grad_input_value(k, dz, xv));
    }
    if (dx) store_pack<VEC>(dx + off, gx);
    if (dz_out) store_pack<VEC>(dz_out + off, gz);
  }
}

}  // namespace fastnorm::cuda
