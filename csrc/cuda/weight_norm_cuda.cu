// Weight norm on CUDA: one launch per direction. A block owns whole slices: it reduces a
// slice (sum of squares forward, sum of grad_w * v backward), then writes it while the
// values are in L1/L2. Slices made of runs (dim 0, a middle dim, the whole tensor) take one
// block each; last-dim slices (strided across rows) take tiles of columns.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <type_traits>

#include "common/weight_norm_math.h"
#include "cuda/cuda_utils.cuh"
#include "weight_norm.h"

namespace fastnorm::cuda {
namespace {

constexpr int kThreads = 256;

enum class Mode { Forward, Backward, Norms };

template <typename T>
struct Sum {
  T s;
};
template <typename T>
__device__ __forceinline__ Sum<T> shfl_xor(const Sum<T>& a, int mask) {
  return {__shfl_xor_sync(0xffffffffu, a.s, mask)};
}
template <typename T>
__device__ __forceinline__ Sum<T> add(const Sum<T>& a, const Sum<T>& b) {
  return {a.s + b.s};
}

template <typename scalar_t, typename acc_t>
struct Pointers {
  const scalar_t* v;
  const scalar_t* grad_w;  // backward
  scalar_t* out;           // w (forward) or grad_v (backward)
  const acc_t* g;
  acc_t* norm;             // written forward and by norms, read backward
  acc_t* grad_g;
  double eps;
};

// What a slice's reduction adds for one value, and the write of one value once the slice's
// total is known. Totals accumulate in float64, as the CPU's chunk totals do: one block
// reduces a whole slice, so each thread adds outer * inner / 256 values in sequence (a
// whole-tensor norm: millions), and in the backward a slice (nearly) parallel to its
// gradient cancels in grad_v, where the dot's precision sets the result's. The kernels are
// bound by memory, not by the float64 adds.
template <Mode M, typename scalar_t, typename acc_t>
struct SliceMath {
  using red_t = double;
  // The VEC values from i on (i a multiple of VEC: one aligned access per tensor).
  template <int VEC>
  static __device__ __forceinline__ red_t contribution(const Pointers<scalar_t, acc_t>& p, int64_t i) {
    const auto xs = load_pack<VEC>(p.v + i);
    red_t s = 0;
    if constexpr (M == Mode::Backward) {
      const auto gs = load_pack<VEC>(p.grad_w + i);
#pragma unroll
      for (int e = 0; e < VEC; ++e) s += red_t(gs.v[e]) * red_t(xs.v[e]);
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) s += red_t(xs.v[e]) * red_t(xs.v[e]);
    }
    return s;
  }
  // Per-slice coefficients from the total: the scale forward, wn_grad backward (in float64:
  // once per slice).
  static __device__ __forceinline__ WeightNormGrad<acc_t> finish(const Pointers<scalar_t, acc_t>& p, int64_t d,
                                                                 red_t total) {
    if constexpr (M == Mode::Backward) {
      const auto k = wn_grad<acc_t>(double(p.g[d]), double(p.norm[d]), double(total));
      p.grad_g[d] = k.grad_g;
      return k;
    } else {
      const double n = wn_norm<double>(double(total), p.eps);  // as the CPU: in float64, then rounded
      p.norm[d] = acc_t(n);
      return {acc_t(0), M == Mode::Forward ? acc_t(double(p.g[d]) / n) : acc_t(0), acc_t(0), acc_t(0)};
    }
  }
  // out = w or grad_v for the VEC values from i on. grad_v may be grad_w itself: each value
  // is read before it is written, by the same thread.
  template <int VEC>
  static __device__ __forceinline__ void write(const Pointers<scalar_t, acc_t>& p, int64_t i,
                                               const WeightNormGrad<acc_t>& k) {
    if constexpr (M != Mode::Norms) {
      const auto xs = load_pack<VEC>(p.v + i);
      Pack<scalar_t, VEC> ys;
      if constexpr (M == Mode::Forward) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) ys.v[e] = scalar_t(acc_t(xs.v[e]) * k.a);
      } else {
        const auto gs = load_pack<VEC>(p.grad_w + i);
#pragma unroll
        for (int e = 0; e < VEC; ++e) ys.v[e] = scalar_t(wn_grad_v<acc_t>(k, acc_t(gs.v[e]), acc_t(xs.v[e])));
      }
      store_pack<VEC>(p.out + i, ys);
    }
  }
};

// One block per slice d = blockIdx.x: `outer` runs of `inner` values, run o at
// (o * D + d) * inner. Packs of VEC values when inner % VEC == 0 and every pointer is
// 16-byte aligned (VEC is 1 otherwise).
template <Mode M, int VEC, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    slice_kernel(Pointers<scalar_t, acc_t> p, int64_t outer, int64_t D, int64_t inner,
                 at::cuda::detail::IntDivider<uint32_t> div_packs) {
  using Math = SliceMath<M, scalar_t, acc_t>;
  using red_t = typename Math::red_t;
  __shared__ Sum<red_t> shared[kWarpSize];
  __shared__ WeightNormGrad<acc_t> coef;
  const int64_t d = blockIdx.x;
  const uint32_t packs = uint32_t(outer * (inner / VEC));
  auto offset = [&](uint32_t t) {
    const auto q = div_packs.divmod(t);
    return (int64_t(q.div) * D + d) * inner + int64_t(q.mod) * VEC;
  };
  red_t s = 0;
  for (uint32_t t = threadIdx.x; t < packs; t += blockDim.x) s += Math::template contribution<VEC>(p, offset(t));
  const Sum<red_t> total = block_reduce(Sum<red_t>{s}, add<red_t>, Sum<red_t>{red_t(0)}, shared);
  if (threadIdx.x == 0) coef = Math::finish(p, d, total.s);
  __syncthreads();
  if constexpr (M == Mode::Norms) return;
  const WeightNormGrad<acc_t> k = coef;
  for (uint32_t t = threadIdx.x; t < packs; t += blockDim.x) Math::template write<VEC>(p, offset(t), k);
}

// Last-dim slices: `outer` rows of D values, slice d the column d. A block takes a tile of
// blockDim.x columns; threadIdx.y walks the rows.
template <Mode M, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) column_kernel(Pointers<scalar_t, acc_t> p, int64_t outer, int64_t D) {
  using Math = SliceMath<M, scalar_t, acc_t>;
  using red_t = typename Math::red_t;
  __shared__ red_t partial[kThreads];
  __shared__ WeightNormGrad<acc_t> coef[kThreads];
  const int tx = threadIdx.x, ty = threadIdx.y, TX = blockDim.x, TY = blockDim.y;
  const int64_t d = int64_t(blockIdx.x) * TX + tx;
  red_t s = 0;
  if (d < D) {
    for (int64_t r = ty; r < outer; r += TY) s += Math::template contribution<1>(p, r * D + d);
  }
  partial[ty * TX + tx] = s;
  __syncthreads();
  for (int stride = TY / 2; stride > 0; stride /= 2) {
    if (ty < stride) partial[ty * TX + tx] += partial[(ty + stride) * TX + tx];
    __syncthreads();
  }
  if (ty == 0 && d < D) coef[tx] = Math::finish(p, d, partial[tx]);
  __syncthreads();
  if constexpr (M == Mode::Norms) return;
  if (d >= D) return;
  const WeightNormGrad<acc_t> k = coef[tx];
  for (int64_t r = ty; r < outer; r += TY) Math::template write<1>(p, r * D + d, k);
}

bool aligned16(const at::Tensor& t) { return !t.defined() || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

template <Mode M>
void launch(const WeightNormArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.v.scalar_type(), "fastnorm_weight_norm_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Pointers<scalar_t, acc_t> p{a.v.data_ptr<scalar_t>(),
                                      ptr_or_null<scalar_t>(a.grad_w),
                                      M == Mode::Forward ? a.w.data_ptr<scalar_t>()
                                                         : (M == Mode::Backward ? a.grad_v.data_ptr<scalar_t>() : nullptr),
                                      ptr_or_null<acc_t>(a.g),
                                      a.norm.data_ptr<acc_t>(),
                                      ptr_or_null<acc_t>(a.grad_g),
                                      a.eps};
    const auto stream = at::cuda::getCurrentCUDAStream();
    if (a.inner == 1 && a.D > 1) {
      const int tx = 32, ty = kThreads / tx;
      const int64_t blocks = (a.D + tx - 1) / tx;
      column_kernel<M, scalar_t, acc_t><<<blocks, dim3(tx, ty), 0, stream>>>(p, a.outer, a.D);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    TORCH_CHECK(a.outer * a.inner < (int64_t(1) << 31), "fastnorm.weight_norm (CUDA): a slice of ", a.outer * a.inner,
                " values is too large (at most 2^31 - 1)");
    TORCH_CHECK(a.D < (int64_t(1) << 31), "fastnorm.weight_norm (CUDA): ", a.D,
                " slices are too many for one block each (at most 2^31 - 1)");
    constexpr int V = vec_width<scalar_t>();
    const bool wide = a.inner % V == 0 && aligned16(a.v) && aligned16(a.grad_w) && aligned16(a.w) && aligned16(a.grad_v);
    auto run = [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      slice_kernel<M, VEC, scalar_t, acc_t><<<a.D, kThreads, 0, stream>>>(
          p, a.outer, a.D, a.inner, at::cuda::detail::IntDivider<uint32_t>(uint32_t(a.inner / VEC)));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (wide) {
      run(std::integral_constant<int, V>{});
    } else {
      run(std::integral_constant<int, 1>{});
    }
  });
}

}  // namespace

void weight_norm_forward(const WeightNormArgs& a) { launch<Mode::Forward>(a); }
void weight_norm_backward(const WeightNormArgs& a) { launch<Mode::Backward>(a); }
void weight_norm_norms(const WeightNormArgs& a) { launch<Mode::Norms>(a); }

}  // namespace fastnorm::cuda
