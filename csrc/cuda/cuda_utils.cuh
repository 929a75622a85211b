// Helpers shared by the CUDA kernels: 16-byte packs, warp and block reductions, the walk
// of a flat index over (plane, channel, position), and the host's occupancy query.
#pragma once

#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <tuple>

namespace fastnorm::cuda {

constexpr int kWarpSize = 32;

// Values per 16-byte access.
template <typename T>
constexpr int vec_width() {
  return 16 / int(sizeof(T));
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <int N, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& v) {
  *reinterpret_cast<Pack<T, N>*>(p) = v;
}

// Linear thread index and count of a (possibly 2-D) block.
__device__ __forceinline__ int thread_rank() { return threadIdx.x + threadIdx.y * blockDim.x; }
__device__ __forceinline__ int block_size() { return blockDim.x * blockDim.y; }

// Reduces a State over the warp with merge(a, b); every lane ends with the result.
// State provides shfl_xor(state, lane_mask).
template <typename State, typename Merge>
__device__ __forceinline__ State warp_reduce(State s, Merge merge) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    s = merge(s, shfl_xor(s, offset));
  }
  return s;
}

// Reduces a State over the block (blockDim a multiple of 32, at most 1024 threads);
// the result is valid in thread 0. `shared` holds 32 States.
template <typename State, typename Merge>
__device__ __forceinline__ State block_reduce(State s, Merge merge, State identity, State* shared) {
  const int t = thread_rank(), lane = t % kWarpSize, warp = t / kWarpSize;
  const int warps = block_size() / kWarpSize;
  s = warp_reduce(s, merge);
  __syncthreads();  // shared may still be read by an earlier reduction
  if (lane == 0) shared[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < warps ? shared[lane] : identity;
    s = warp_reduce(s, merge);
  }
  return s;
}

// The values of a planar (N, C, S) tensor (or of a channels-innermost one, S = 1) from
// flat index `first` on, as channel c and position r within its run of S: at(i) for the
// value first + i, next() to step one value. 32-bit arithmetic (fast division): the host
// launches in chunks of fewer than 2^31 values and passes the chunk's start position.
struct ChannelWalk {
  at::cuda::detail::IntDivider<uint32_t> div_s, div_c;
  uint32_t S, C, r0, c0;
  ChannelWalk(int64_t S_, int64_t C_, int64_t first)
      : div_s(uint32_t(S_)), div_c(uint32_t(C_)), S(uint32_t(S_)), C(uint32_t(C_)),
        r0(uint32_t(first % S_)), c0(uint32_t((first / S_) % C_)) {}

  struct Position {
    uint32_t c, r;
  };
  __device__ __forceinline__ Position at(uint32_t i) const {
    const auto qs = div_s.divmod(r0 + i);
    return {div_c.mod(c0 + qs.div), qs.mod};
  }
  __device__ __forceinline__ void next(Position& p) const {
    if (++p.r == S) {
      p.r = 0;
      p.c = p.c + 1 == C ? 0 : p.c + 1;
    }
  }
};

// Blocks of `kernel` of `threads` threads with `bytes` of dynamic shared memory that one
// multiprocessor of the current device holds at once; asked of the driver once per device,
// kernel and size (the call costs more than a launch).
inline int resident_blocks(const void* kernel, int threads, int64_t bytes) {
  static std::mutex mutex;
  static std::map<std::tuple<int, const void*, int, int64_t>, int> cache;
  const auto key = std::make_tuple(int(c10::cuda::current_device()), kernel, threads, bytes);
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, size_t(bytes)));
  cache.emplace(key, blocks);
  return blocks;
}

}  // namespace fastnorm::cuda
