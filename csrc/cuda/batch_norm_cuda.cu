// Host side of the batch-norm CUDA kernels: launch configuration, workspace and the
// dispatch over dtype, activation, vector width and index width.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <ATen/cuda/CUDAGraphsUtils.cuh>

#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "batch_norm.h"
#include "cuda/batch_norm_kernels.cuh"
#include "cuda/batch_norm_on_chip.cuh"

namespace fastnorm::cuda {
namespace {

// Last-block counters: zero when no kernel runs (each reduction leaves them at zero), kept
// per (device, stream) so that kernels on different streams never share one. Allocated
// (zeroed) once per stream and never freed, so a pointer handed out stays valid. While a
// CUDA graph is being captured the counters belong to the call instead: zeroed by a
// captured memset, so every replay starts from zero.
unsigned int* block_counters(int64_t n, at::Tensor& call_owned) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto opts = at::TensorOptions().dtype(at::kInt).device(at::kCUDA, stream.device_index());
  if (at::cuda::currentStreamCaptureStatusMayInitCtx() != at::cuda::CaptureStatus::None) {
    call_owned = at::zeros({n}, opts);
    return reinterpret_cast<unsigned int*>(call_owned.data_ptr<int>());
  }
  static std::mutex mutex;
  static std::map<std::pair<int, cudaStream_t>, std::vector<at::Tensor>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto& arrays = cache[{stream.device_index(), stream.stream()}];
  if (arrays.empty() || arrays.back().numel() < n) arrays.push_back(at::zeros({std::max<int64_t>(n, 1024)}, opts));
  return reinterpret_cast<unsigned int*>(arrays.back().data_ptr<int>());
}

int multiprocessors() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

bool aligned16(const at::Tensor& t) {
  return !t.defined() || reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

template <typename acc_t>
ChannelInputs<acc_t> channel_inputs(const NormArgs& a) {
  return {ptr_or_null<acc_t>(a.weight), ptr_or_null<acc_t>(a.bias), ptr_or_null<acc_t>(a.mean),
          ptr_or_null<acc_t>(a.var), a.eps};
}

// Calls f(integral_constant<int, VEC>) with the 16-byte width when every tensor allows it
// (16-byte aligned; for the channels-innermost reduction also C % VEC == 0), else 1.
template <typename scalar_t, typename F>
void with_vec(bool wide, F&& f) {
  constexpr int V = vec_width<scalar_t>();
  if (wide) {
    f(std::integral_constant<int, V>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

// Element-wise kernels index with 32 bits: f(first, count) per chunk of the flat tensor,
// the last chunk first (the element-wise passes walk back to front).
constexpr int64_t kChunk = int64_t(1) << 30;

template <typename F>
void for_each_chunk(int64_t numel, F&& f) {
  if (numel <= 0) return;
  for (int64_t first = (numel - 1) / kChunk * kChunk; first >= 0; first -= kChunk) {
    f(first, std::min(kChunk, numel - first));
  }
}

void check_32bit_sizes(const Layout& L) {
  TORCH_CHECK(L.S < (int64_t(1) << 30) && L.C < (int64_t(1) << 30), "fastnorm.batch_norm (CUDA): spatial size ", L.S,
              " and channel count ", L.C, " must each be below 2^30");
}

// ---------------------------------------------------------------------------------------
// Reductions.

// Runs the reduction of `op` over every channel, calling finish(c, total) once per channel.
template <typename scalar_t, typename Op, typename Finish>
void reduce(const NormArgs& a, const Op& op, const Finish& finish, std::initializer_list<at::Tensor> tensors) {
  using State = typename Op::State;
  using acc_t = typename Finish::acc_t;
  const Layout& L = a.layout;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t target_blocks = int64_t(multiprocessors()) * 4;
  bool aligned = true;
  for (const auto& t : tensors) aligned = aligned && aligned16(t);
  constexpr int V = vec_width<scalar_t>();
  if (!L.channels_last) {
    with_vec<scalar_t>(aligned, [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      // Each plane is covered by `slots` packs (one more when it starts mid-pack).
      const int64_t slots = (L.S + VEC - 1) / VEC + (VEC > 1 ? 1 : 0);
      const int64_t items = L.N * slots;
      TORCH_CHECK(items < (int64_t(1) << 31), "fastnorm.batch_norm (CUDA): too many values per channel (",
                  L.count(), ")");
      int64_t splits = std::clamp<int64_t>((target_blocks + L.C - 1) / L.C, 1,
                                           std::max<int64_t>(1, items / (kThreads * 4)));
      const int64_t per_split = (items + splits - 1) / splits;
      splits = (items + per_split - 1) / per_split;
      at::Tensor ws = at::empty({L.C * splits * int64_t(sizeof(State))}, a.input.options().dtype(at::kByte));
      at::Tensor captured;
      unsigned int* counters = block_counters(L.C, captured);
      const auto grid_c = unsigned(std::min<int64_t>(L.C, INT32_MAX));  // (the kernel loops past it)
      reduce_planar_kernel<VEC, scalar_t><<<dim3(grid_c, unsigned(splits)), kThreads, 0, stream>>>(
          op, finish, L.C, L.S, L.numel(), uint32_t(items), uint32_t(per_split),
          at::cuda::detail::IntDivider<uint32_t>(uint32_t(slots)), reinterpret_cast<State*>(ws.data_ptr()), counters);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return;
  }
  const int64_t M = L.count();
  with_vec<scalar_t>(aligned && L.C % V == 0, [&](auto vec) {
    constexpr int VEC = decltype(vec)::value;
    const int64_t channel_packs = (L.C + VEC - 1) / VEC;
    // A tile reads at most a 128-byte line of each row: more tiles, so fewer row splits for
    // the same blocks, and fewer partials for each tile's last block to merge.
    const int tx_max = std::clamp(128 / int(VEC * sizeof(scalar_t)), 1, 32);
    int tx = 1;
    while (tx < tx_max && tx < channel_packs) tx *= 2;
    const int ty = kThreads / tx;
    const int64_t tiles = (channel_packs + tx - 1) / tx;
    int64_t splits = std::clamp<int64_t>((target_blocks + tiles - 1) / tiles, 1,
                                         std::max<int64_t>(1, M / (int64_t(ty) * 8)));
    const int64_t rows_per_split = (M + splits - 1) / splits;
    splits = (M + rows_per_split - 1) / rows_per_split;
    at::Tensor ws = at::empty({splits * L.C * int64_t(sizeof(State))}, a.input.options().dtype(at::kByte));
    at::Tensor captured;
    unsigned int* counters = block_counters(tiles, captured);
    const size_t smem = size_t(kThreads) * VEC * sizeof(State);
    reduce_rows_kernel<VEC, scalar_t><<<dim3(unsigned(tiles), unsigned(splits)), dim3(tx, ty), smem, stream>>>(
        op, finish, M, L.C, rows_per_split, reinterpret_cast<State*>(ws.data_ptr()), counters);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---------------------------------------------------------------------------------------
// Element-wise passes.

int64_t elementwise_blocks(int64_t work) {
  return std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, int64_t(multiprocessors()) * 8));
}

template <typename scalar_t, typename acc_t, Activation A>
void normalize(const NormArgs& a, const at::Tensor& output, const ChannelCoef<acc_t>* coef, int64_t* nbt) {
  const Layout& L = a.layout;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t numel = L.numel();
  const int64_t walk_s = L.channels_last ? 1 : L.S;
  with_vec<scalar_t>(aligned16(a.input) && aligned16(a.residual) && aligned16(output), [&](auto vec) {
    constexpr int VEC = decltype(vec)::value;
    const scalar_t* res = ptr_or_null<scalar_t>(a.residual);
    for_each_chunk(numel, [&](int64_t first, int64_t n) {
      normalize_kernel<VEC, scalar_t, acc_t, A><<<elementwise_blocks(n / VEC + 1), kThreads, 0, stream>>>(
          a.input.data_ptr<scalar_t>() + first, res ? res + first : nullptr, output.data_ptr<scalar_t>() + first,
          uint32_t(n), ChannelWalk(walk_s, L.C, first), coef, acc_t(a.slope), first == 0 ? nbt : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

template <typename scalar_t, typename acc_t, Activation A>
GradOp<scalar_t, acc_t, A> grad_op(const BackwardArgs& a) {
  const bool needs_z = activation_needs_z(a.act, a.slope);
  const at::Tensor& v = needs_z ? a.residual : a.output;
  return {a.input.data_ptr<scalar_t>(), a.grad_out.data_ptr<scalar_t>(),
          A == Activation::None ? nullptr : ptr_or_null<scalar_t>(v), needs_z, acc_t(a.slope),
          channel_inputs<acc_t>(a)};
}

template <typename scalar_t, typename acc_t, Activation A>
void grad_input(const BackwardArgs& a, const ChannelCoef<acc_t>* coef) {
  const Layout& L = a.layout;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t numel = L.numel();
  const int64_t walk_s = L.channels_last ? 1 : L.S;
  const auto op = grad_op<scalar_t, acc_t, A>(a);
  const bool aligned = aligned16(a.input) && aligned16(a.grad_out) && aligned16(a.output) && aligned16(a.residual) &&
                       aligned16(a.grad_input) && aligned16(a.grad_preact);
  scalar_t* dx = ptr_or_null<scalar_t>(a.grad_input);
  scalar_t* dz = ptr_or_null<scalar_t>(a.grad_preact);
  with_vec<scalar_t>(aligned, [&](auto vec) {
    constexpr int VEC = decltype(vec)::value;
    for_each_chunk(numel, [&](int64_t first, int64_t n) {
      auto chunk = op;
      chunk.x += first;
      chunk.dy += first;
      if (chunk.v) chunk.v += first;
      grad_input_kernel<VEC, scalar_t, acc_t, A><<<elementwise_blocks(n / VEC + 1), kThreads, 0, stream>>>(
          chunk, dx ? dx + first : nullptr, dz ? dz + first : nullptr, uint32_t(n), ChannelWalk(walk_s, L.C, first),
          coef);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

template <typename acc_t>
void coefficients(const NormArgs& a, bool backward, bool training, const at::Tensor& mean_dz,
                  const at::Tensor& mean_dz_xmu, ChannelCoef<acc_t>* coef) {
  const int64_t C = a.layout.C;
  const int blocks = int(std::min<int64_t>((C + kThreads - 1) / kThreads, 1024));
  coef_kernel<acc_t><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      channel_inputs<acc_t>(a), backward, training, ptr_or_null<acc_t>(mean_dz), ptr_or_null<acc_t>(mean_dz_xmu), C,
      coef);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The element pass's per-channel coefficients: a buffer from the caching allocator (kept
// alive by the returned tensor) and its typed pointer.
template <typename acc_t>
std::pair<at::Tensor, ChannelCoef<acc_t>*> channel_coefs(const NormArgs& a) {
  at::Tensor t = at::empty({a.layout.C * int64_t(sizeof(ChannelCoef<acc_t>))}, a.input.options().dtype(at::kByte));
  auto* k = reinterpret_cast<ChannelCoef<acc_t>*>(t.data_ptr());
  return {std::move(t), k};
}

// ---------------------------------------------------------------------------------------
// The on-chip kernels (batch_norm_on_chip.cuh).

// Their pack width: the widest, up to 16 bytes, that divides S and to whose size every
// tensor is aligned (so each plane starts on a pack).
template <typename scalar_t>
int slab_pack_width(int64_t S, std::initializer_list<at::Tensor> tensors) {
  int vec = vec_width<scalar_t>();
  for (; vec > 1; vec /= 2) {
    const auto bytes = uintptr_t(vec) * sizeof(scalar_t);
    bool fits = S % vec == 0;
    for (const auto& t : tensors) {
      fits = fits && (!t.defined() || reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes == 0);
    }
    if (fits) break;
  }
  return vec;
}

// Calls f(integral_constant<int, VEC>) for vec in {1, 2, 4, 8}, up to the 16-byte width.
template <typename scalar_t, typename F>
void with_pack_width(int vec, F&& f) {
  constexpr int V = vec_width<scalar_t>();
  if constexpr (V >= 8) {
    if (vec == 8) return f(std::integral_constant<int, 8>{});
  }
  if constexpr (V >= 4) {
    if (vec == 4) return f(std::integral_constant<int, 4>{});
  }
  if (vec == 2) return f(std::integral_constant<int, 2>{});
  f(std::integral_constant<int, 1>{});
}

// The most dynamic shared memory a block of `kernel` may have on the current device (the
// opt-in limit less the kernel's static shared memory), set as the kernel's limit on first
// use so that no launch ever needs a different one. Remembered: the driver calls cost more
// than a launch.
struct SharedMemory {
  std::mutex mutex;
  std::map<std::pair<int, const void*>, int64_t> limit;
};

SharedMemory& shared_memory() {
  static SharedMemory s;
  return s;
}

int64_t dynamic_shared_limit(const void* kernel) {
  SharedMemory& s = shared_memory();
  const auto key = std::make_pair(int(c10::cuda::current_device()), kernel);
  std::lock_guard<std::mutex> lock(s.mutex);
  auto it = s.limit.find(key);
  if (it != s.limit.end()) return it->second;
  cudaFuncAttributes attrs;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attrs, kernel));
  const int64_t limit =
      int64_t(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin) - int64_t(attrs.sharedSizeBytes);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(limit)));
  s.limit.emplace(key, limit);
  return limit;
}

// The dynamic shared memory of an on-chip launch of `kernel` holding `slabs` tensors per
// channel, or 0 when the on-chip kernels do not apply: channels innermost, or planes too
// short for coalesced reads; slabs that leave fewer than two blocks per multiprocessor; or
// too few channels (one block each) to give every multiprocessor three blocks, or as many
// as it holds, where the reduction that splits each channel over many blocks keeps more of
// the GPU busy.
template <typename Kernel>
size_t on_chip_bytes(Kernel* kernel, const Layout& L, int64_t elem, int slabs) {
  const int sms = multiprocessors();
  if (L.channels_last || L.S * elem < 64 || L.C < 2 * int64_t(sms)) return 0;
  const auto* k = reinterpret_cast<const void*>(kernel);
  const int64_t limit = dynamic_shared_limit(k);
  if (L.count() > limit) return 0;  // (before the product below can overflow)
  const int64_t bytes = L.count() * elem * slabs;
  if (bytes > limit) return 0;
  const int per_sm = resident_blocks(k, kThreads, bytes);
  if (per_sm < 2 || L.C < int64_t(std::min(per_sm, 3)) * sms) return 0;
  return size_t(bytes);
}

template <int VEC>
SlabWalk<VEC> slab_walk(const Layout& L) {
  return {L.C, L.S, at::cuda::detail::IntDivider<uint32_t>(uint32_t(L.S / VEC))};
}

// The on-chip kernels serve float32 accumulation only: float64 batch norm is rare on a GPU,
// and its division routine spills registers inside them.
template <typename acc_t>
constexpr bool kOnChip = std::is_same_v<acc_t, float>;

// The training forward in one launch, when it applies; false otherwise (nothing done).
template <typename scalar_t, typename acc_t, Activation A>
bool train_on_chip(const TrainArgs& a, const TrainFinish<acc_t>& finish, int64_t* nbt) {
  if constexpr (!kOnChip<acc_t>) {
    return false;
  } else {
    const Layout& L = a.layout;
    bool launched = false;
    with_pack_width<scalar_t>(slab_pack_width<scalar_t>(L.S, {a.input, a.residual, a.output}), [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      auto* kernel = &train_on_chip_kernel<VEC, scalar_t, acc_t, A>;
      const size_t bytes = on_chip_bytes(kernel, L, sizeof(scalar_t), 1);
      if (bytes == 0) return;
      at::Tensor captured;
      unsigned int* counter = nbt ? block_counters(1, captured) : nullptr;
      kernel<<<unsigned(L.C), kThreads, bytes, at::cuda::getCurrentCUDAStream()>>>(
          a.input.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(a.residual), a.output.data_ptr<scalar_t>(),
          slab_walk<VEC>(L), uint32_t(L.count() / VEC), finish, acc_t(a.slope), nbt, counter);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      launched = true;
    });
    return launched;
  }
}

// The fused backward (sums, parameter gradients, grad input) in one launch, when it
// applies; false otherwise (nothing done).
template <typename scalar_t, typename acc_t, Activation A>
bool backward_on_chip(const BackwardArgs& a, const GradOp<scalar_t, acc_t, A>& op, const GradFinish<acc_t>& finish) {
  if constexpr (!kOnChip<acc_t>) {
    return false;
  } else {
    const Layout& L = a.layout;
    bool launched = false;
    const int vec = slab_pack_width<scalar_t>(
        L.S, {a.input, a.grad_out, a.output, a.residual, a.grad_input, a.grad_preact});
    with_pack_width<scalar_t>(vec, [&](auto v) {
      constexpr int VEC = decltype(v)::value;
      auto* kernel = &backward_on_chip_kernel<VEC, scalar_t, acc_t, A>;
      const size_t bytes = on_chip_bytes(kernel, L, sizeof(scalar_t), op.v ? 3 : 2);
      if (bytes == 0) return;
      kernel<<<unsigned(L.C), kThreads, bytes, at::cuda::getCurrentCUDAStream()>>>(
          op, ptr_or_null<scalar_t>(a.grad_input), ptr_or_null<scalar_t>(a.grad_preact), slab_walk<VEC>(L),
          uint32_t(L.count() / VEC), finish);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      launched = true;
    });
    return launched;
  }
}

// Calls f(scalar_t{}, acc_t{}, integral_constant<Activation>), after the size checks that
// must pass before any kernel writes anything.
template <typename F>
void dispatch(const NormArgs& a, F&& f) {
  check_32bit_sizes(a.layout);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.input.scalar_type(), "fastnorm_batch_norm_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_activation(a.act, [&](auto A) { f(scalar_t{}, acc_t{}, A); });
  });
}

}  // namespace

void batch_norm_stats(const NormArgs& a) {
  check_32bit_sizes(a.layout);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.input.scalar_type(), "fastnorm_batch_norm_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const StatsReduce<scalar_t, acc_t> op{{a.input.data_ptr<scalar_t>()}};
    const StatsFinish<acc_t> finish{a.mean.data_ptr<acc_t>(), a.var.data_ptr<acc_t>()};
    reduce<scalar_t>(a, op, finish, {a.input});
  });
}

void batch_norm_train(const TrainArgs& a) {
  dispatch(a, [&](auto s, auto acc, auto A) {
    using scalar_t = decltype(s);
    using acc_t = decltype(acc);
    auto [coef, k] = channel_coefs<acc_t>(a);
    int64_t* nbt = ptr_or_null<int64_t>(a.num_batches_tracked);
    const StatsReduce<scalar_t, acc_t> op{{a.input.data_ptr<scalar_t>()}};
    const TrainFinish<acc_t> finish{channel_inputs<acc_t>(a), a.mean.data_ptr<acc_t>(), a.var.data_ptr<acc_t>(),
                                    ptr_or_null<acc_t>(a.running_mean), ptr_or_null<acc_t>(a.running_var), nbt,
                                    a.momentum, a.cumulative, k};
    if (train_on_chip<scalar_t, acc_t, decltype(A)::value>(a, finish, nbt)) return;
    reduce<scalar_t>(a, op, finish, {a.input});
    normalize<scalar_t, acc_t, decltype(A)::value>(a, a.output, k, nbt);
  });
}

void batch_norm_elemt(const NormArgs& a, const at::Tensor& output) {
  dispatch(a, [&](auto s, auto acc, auto A) {
    using scalar_t = decltype(s);
    using acc_t = decltype(acc);
    auto [coef, k] = channel_coefs<acc_t>(a);
    coefficients<acc_t>(a, false, false, at::Tensor(), at::Tensor(), k);
    normalize<scalar_t, acc_t, decltype(A)::value>(a, output, k, nullptr);
  });
}

void batch_norm_backward(const BackwardArgs& a) {
  dispatch(a, [&](auto s, auto acc, auto A) {
    using scalar_t = decltype(s);
    using acc_t = decltype(acc);
    constexpr Activation act = decltype(A)::value;
    auto [coef, k] = channel_coefs<acc_t>(a);
    const bool want_params = a.grad_weight.defined() || a.grad_bias.defined();
    const bool want_elemt = a.grad_input.defined() || a.grad_preact.defined();
    if (want_params || (a.training && a.grad_input.defined())) {
      const GradReduce<scalar_t, acc_t, act> op{grad_op<scalar_t, acc_t, act>(a)};
      const GradFinish<acc_t> finish{channel_inputs<acc_t>(a), a.training, acc_t(a.layout.count()),
                                     ptr_or_null<acc_t>(a.grad_weight), ptr_or_null<acc_t>(a.grad_bias), k};
      if (want_elemt && backward_on_chip<scalar_t, acc_t, act>(a, op, finish)) return;
      reduce<scalar_t>(a, op, finish, {a.input, a.grad_out, a.output, a.residual});
    } else {
      coefficients<acc_t>(a, true, a.training, at::Tensor(), at::Tensor(), k);
    }
    if (want_elemt) grad_input<scalar_t, acc_t, act>(a, k);
  });
}

void batch_norm_backward_reduce(const BackwardArgs& a) {
  dispatch(a, [&](auto s, auto acc, auto A) {
    using scalar_t = decltype(s);
    using acc_t = decltype(acc);
    constexpr Activation act = decltype(A)::value;
    const GradReduce<scalar_t, acc_t, act> op{grad_op<scalar_t, acc_t, act>(a)};
    const SumsFinish<acc_t> finish{a.sum_dz.data_ptr<acc_t>(), a.sum_dz_xmu.data_ptr<acc_t>()};
    reduce<scalar_t>(a, op, finish, {a.input, a.grad_out, a.output, a.residual});
  });
}

void batch_norm_backward_elemt(const BackwardArgs& a) {
  dispatch(a, [&](auto s, auto acc, auto A) {
    using scalar_t = decltype(s);
    using acc_t = decltype(acc);
    auto [coef, k] = channel_coefs<acc_t>(a);
    coefficients<acc_t>(a, true, true, a.mean_dz, a.mean_dz_xmu, k);
    grad_input<scalar_t, acc_t, decltype(A)::value>(a, k);
  });
}

}  // namespace fastnorm::cuda
