// Weight norm on CUDA: one launch per direction. A slice is reduced (sum of squares forward,
// sum of grad_w * v backward), then written while its values are in L1/L2. Slices made of
// runs (dim 0, a middle dim) take one block each, or a warp each when short; when they are
// too few to fill the GPU (the whole tensor is one slice) several blocks share a slice and
// meet at a grid-wide barrier (a cooperative launch); last-dim slices (strided across rows)
// take tiles of columns.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cooperative_groups.h>

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
  SliceValues<scalar_t, acc_t> g;  // (unset for norms)
  acc_t* norm;                      // written forward and by norms, read backward
  SliceValues<scalar_t, acc_t> grad_g;
  double eps;
};

// What a slice's reduction adds for one value, and the write of one value once the slice's
// total is known. Totals accumulate in float64, as the CPU's chunk totals do: a thread adds
// thousands of values in sequence where one block (or a few) reduces a long slice, and in the
// backward a slice (nearly) parallel to its gradient cancels in grad_v, where the dot's
// precision sets the result's. The kernels are bound by memory, not by the float64 adds.
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
  // once per slice). `store`: this block writes the slice's norm or grad_g.
  static __device__ __forceinline__ WeightNormGrad<acc_t> finish(const Pointers<scalar_t, acc_t>& p, int64_t d,
                                                                 red_t total, bool store = true) {
    if constexpr (M == Mode::Backward) {
      const auto k = wn_grad<acc_t>(p.g.get(d), double(p.norm[d]), double(total));
      if (store) p.grad_g.set(d, k.grad_g);
      return k;
    } else {
      const double n = wn_norm<double>(double(total), p.eps);  // as the CPU: in float64, then rounded
      if (store) p.norm[d] = acc_t(n);
      return {acc_t(0), M == Mode::Forward ? acc_t(p.g.get(d) / n) : acc_t(0), acc_t(0), acc_t(0)};
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

// Where pack t of slice d starts: run t / (inner / VEC), pack t % (inner / VEC) of that run.
template <int VEC>
__device__ __forceinline__ int64_t pack_offset(const at::cuda::detail::IntDivider<uint32_t>& div_packs, uint32_t t,
                                               int64_t D, int64_t d, int64_t inner) {
  const auto q = div_packs.divmod(t);
  return (int64_t(q.div) * D + d) * inner + int64_t(q.mod) * VEC;
}

// Slice d of `outer` runs of `inner` values, run o at (o * D + d) * inner. Packs of VEC
// values when inner % VEC == 0 and every pointer is 16-byte aligned (VEC is 1 otherwise).
// Without kShared, one block per slice (d = blockIdx.x). With kShared, `parts` blocks to a
// slice: block b takes part b % parts of slice b / parts (every parts-th group of blockDim.x
// packs); the parts' totals meet through `partial` (one per block) and a grid-wide barrier,
// so the launch must be cooperative, with every block resident. Every block of a slice then
// sums the same parts in the same order (the same total, to the bit) and writes its own
// part; the first also stores the norm or grad_g.
template <Mode M, int VEC, bool kShared, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    slice_kernel(Pointers<scalar_t, acc_t> p, int64_t outer, int64_t D, int64_t inner, uint32_t parts,
                 at::cuda::detail::IntDivider<uint32_t> div_packs, double* partial) {
  using Math = SliceMath<M, scalar_t, acc_t>;
  using red_t = typename Math::red_t;
  static_assert(std::is_same_v<red_t, double>, "partial holds float64 totals");
  __shared__ Sum<red_t> shared[kWarpSize];
  __shared__ WeightNormGrad<acc_t> coef;
  const uint32_t n_parts = kShared ? parts : 1;
  const int64_t d = blockIdx.x / n_parts;
  const uint32_t part = blockIdx.x % n_parts;
  const uint32_t packs = uint32_t(outer * (inner / VEC));
  const uint32_t first = part * blockDim.x + threadIdx.x, step = n_parts * blockDim.x;
  auto offset = [&](uint32_t t) { return pack_offset<VEC>(div_packs, t, D, d, inner); };
  red_t s = 0;
  for (uint32_t t = first; t < packs; t += step) s += Math::template contribution<VEC>(p, offset(t));
  Sum<red_t> total = block_reduce(Sum<red_t>{s}, add<red_t>, Sum<red_t>{red_t(0)}, shared);
  if constexpr (kShared) {
    if (threadIdx.x == 0) partial[blockIdx.x] = total.s;
    cooperative_groups::this_grid().sync();
    red_t t = 0;
    for (uint32_t k = threadIdx.x; k < n_parts; k += blockDim.x) t += __ldcg(partial + d * n_parts + k);
    total = block_reduce(Sum<red_t>{t}, add<red_t>, Sum<red_t>{red_t(0)}, shared);
  }
  if (threadIdx.x == 0) coef = Math::finish(p, d, total.s, part == 0);
  __syncthreads();
  if constexpr (M == Mode::Norms) return;
  const WeightNormGrad<acc_t> k = coef;
  for (uint32_t t = first; t < packs; t += step) Math::template write<VEC>(p, offset(t), k);
}

// Short slices (at most kWarpPacks packs): a warp each, kThreads / 32 slices to a block.
// With a block each, most of its threads would have no value (dim 0 of a (50000, 16)
// float32 embedding weight: 4 of 256). The butterfly reduction leaves the same total in every
// lane (each step adds the same two values in either order), so every lane takes the
// coefficients itself and the first stores the norm or grad_g. No block-wide barrier:
// warps past the last slice return at once.
constexpr int kWarpPacks = 2 * kWarpSize;

template <Mode M, int VEC, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    warp_slice_kernel(Pointers<scalar_t, acc_t> p, int64_t outer, int64_t D, int64_t inner,
                      at::cuda::detail::IntDivider<uint32_t> div_packs) {
  using Math = SliceMath<M, scalar_t, acc_t>;
  using red_t = typename Math::red_t;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t d = int64_t(blockIdx.x) * (kThreads / kWarpSize) + threadIdx.x / kWarpSize;
  if (d >= D) return;
  const uint32_t packs = uint32_t(outer * (inner / VEC));
  auto offset = [&](uint32_t t) { return pack_offset<VEC>(div_packs, t, D, d, inner); };
  red_t s = 0;
  for (uint32_t t = lane; t < packs; t += kWarpSize) s += Math::template contribution<VEC>(p, offset(t));
  const red_t total = warp_reduce(Sum<red_t>{s}, add<red_t>).s;
  const WeightNormGrad<acc_t> k = Math::finish(p, d, total, lane == 0);
  if constexpr (M == Mode::Norms) return;
  for (uint32_t t = lane; t < packs; t += kWarpSize) Math::template write<VEC>(p, offset(t), k);
}

// Last-dim slices: `outer` rows of D values, slice d the column d. A block takes a tile of
// blockDim.x columns; threadIdx.y walks the rows. Blocks of up to 1024 threads, four rows in
// flight per thread, and tiles narrow enough to fill the GPU: a thread issues one 4-byte
// access per row, so it takes many threads and loads in flight to keep memory busy (with 256
// threads and 32-column tiles, 4096x4096 float32 ran at 0.19x of torch on an H200).
constexpr int kColumnThreads = 1024, kColumnMaxWidth = 256, kSectorBytes = 32;

template <Mode M, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kColumnThreads)
    column_kernel(Pointers<scalar_t, acc_t> p, int64_t outer, int64_t D) {
  using Math = SliceMath<M, scalar_t, acc_t>;
  using red_t = typename Math::red_t;
  __shared__ red_t partial[kColumnThreads];
  __shared__ WeightNormGrad<acc_t> coef[kColumnMaxWidth];
  const int tx = threadIdx.x, ty = threadIdx.y, TX = blockDim.x, TY = blockDim.y;
  const int64_t d = int64_t(blockIdx.x) * TX + tx;
  red_t s = 0;
  if (d < D) {
#pragma unroll 4
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
#pragma unroll 4
  for (int64_t r = ty; r < outer; r += TY) Math::template write<1>(p, r * D + d, k);
}

// Blocks to a slice for slice_kernel<kShared>, or 1 where one block per slice fills the GPU
// (or the slice is too short to share): the resident blocks over the slices, with at least
// kMinPacksPerThread packs for each thread.
constexpr int64_t kMinPacksPerThread = 8;

template <typename Kernel>
uint32_t parts_per_slice(Kernel kernel, int64_t D, int64_t packs) {
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t most_resident = int64_t(prop->maxThreadsPerMultiProcessor / kThreads) * prop->multiProcessorCount;
  // The usual case returns here, before the occupancy query: slices enough to fill the GPU.
  if (2 * D > most_resident || packs < 2 * kThreads * kMinPacksPerThread || !prop->cooperativeLaunch) return 1;
#if defined(CUDART_VERSION) && CUDART_VERSION < 12000
  // Before CUDA 12 a cooperative launch could not be captured into a graph.
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(at::cuda::getCurrentCUDAStream(), &capturing));
  if (capturing != cudaStreamCaptureStatusNone) return 1;
#endif
  const int64_t resident =
      int64_t(resident_blocks(reinterpret_cast<const void*>(kernel), kThreads, 0)) * prop->multiProcessorCount;
  const int64_t by_work = packs / (kThreads * kMinPacksPerThread);
  return uint32_t(std::max<int64_t>(1, std::min(resident / std::max<int64_t>(D, 1), by_work)));
}

bool aligned16(const at::Tensor& t) { return !t.defined() || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// g or grad_g as the kernels read and write it (undefined: never touched).
template <typename T, typename A>
SliceValues<T, A> slice_values(const at::Tensor& t, const WeightNormArgs& a) {
  return {t.defined() ? t.data_ptr() : nullptr, g_in_acc(a)};
}

template <Mode M>
void launch(const WeightNormArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.v.scalar_type(), "fastnorm_weight_norm_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Pointers<scalar_t, acc_t> p{a.v.data_ptr<scalar_t>(),
                                      ptr_or_null<scalar_t>(a.grad_w),
                                      M == Mode::Forward ? a.w.data_ptr<scalar_t>()
                                                         : (M == Mode::Backward ? a.grad_v.data_ptr<scalar_t>() : nullptr),
                                      slice_values<scalar_t, acc_t>(a.g, a),
                                      a.norm.data_ptr<acc_t>(),
                                      slice_values<scalar_t, acc_t>(a.grad_g, a),
                                      a.eps};
    const auto stream = at::cuda::getCurrentCUDAStream();
    if (a.inner == 1 && a.D > 1) {
      // Columns a block takes: as few as leave blocks for 3/4 of the GPU's threads, but a
      // 32-byte sector of each row at least (8 float32 values). A (4096, 4096) weight takes
      // 16 (256 blocks, two per SM on an H100/H200), not 32 (128 blocks, half the threads
      // the SMs hold). Rows a block walks at once: the rest of its 1024 threads, a power of 2
      // (the tree over them), no more than the rows there are.
      const auto* prop = at::cuda::getCurrentDeviceProperties();
      const int64_t gpu_threads = int64_t(prop->maxThreadsPerMultiProcessor) * prop->multiProcessorCount;
      const int min_tx = std::max<int>(8, kSectorBytes / int(sizeof(scalar_t)));
      int tx = kColumnMaxWidth;
      while (tx > min_tx && (a.D + tx - 1) / tx * kColumnThreads < gpu_threads * 3 / 4) tx /= 2;
      int ty = kColumnThreads / tx;
      while (ty > 1 && ty / 2 >= a.outer) ty /= 2;
      const int64_t blocks = (a.D + tx - 1) / tx;
      column_kernel<M, scalar_t, acc_t><<<blocks, dim3(tx, ty), 0, stream>>>(p, a.outer, a.D);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    TORCH_CHECK(a.outer * a.inner < (int64_t(1) << 31), "fastnorm.weight_norm (CUDA): a slice of ", a.outer * a.inner,
                " values is too large (at most 2^31 - 1)");
    TORCH_CHECK(a.D < (int64_t(1) << 31), "fastnorm.weight_norm (CUDA): ", a.D,
                " slices are too many (at most 2^31 - 1)");
    constexpr int V = vec_width<scalar_t>();
    const bool wide = a.inner % V == 0 && aligned16(a.v) && aligned16(a.grad_w) && aligned16(a.w) && aligned16(a.grad_v);
    auto run = [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      at::cuda::detail::IntDivider<uint32_t> div_packs(uint32_t(a.inner / VEC));
      if (a.outer * (a.inner / VEC) <= kWarpPacks) {
        constexpr int64_t kWarps = kThreads / kWarpSize;
        warp_slice_kernel<M, VEC, scalar_t, acc_t>
            <<<(a.D + kWarps - 1) / kWarps, kThreads, 0, stream>>>(p, a.outer, a.D, a.inner, div_packs);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        return;
      }
      auto shared_kernel = slice_kernel<M, VEC, true, scalar_t, acc_t>;
      uint32_t parts = parts_per_slice(shared_kernel, a.D, a.outer * (a.inner / VEC));
      if (parts > 1) {
        auto partial = at::empty({a.D * parts}, a.v.options().dtype(at::kDouble));
        double* partial_ptr = partial.data_ptr<double>();
        Pointers<scalar_t, acc_t> p_arg = p;
        int64_t outer = a.outer, D = a.D, inner = a.inner;
        void* args[] = {&p_arg, &outer, &D, &inner, &parts, &div_packs, &partial_ptr};
        const auto err = cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(shared_kernel),
                                                     dim3(uint32_t(a.D * parts)), dim3(kThreads), args, 0, stream);
        if (err != cudaErrorCooperativeLaunchTooLarge) {  // (fewer SMs than reported, MPS: one block a slice)
          C10_CUDA_CHECK(err);
          return;
        }
        (void)cudaGetLastError();
      }
      slice_kernel<M, VEC, false, scalar_t, acc_t>
          <<<a.D, kThreads, 0, stream>>>(p, a.outer, a.D, a.inner, 1, div_packs, nullptr);
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
