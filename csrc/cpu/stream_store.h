// Non-temporal ("streaming") stores for the CPU element passes. A regular store first reads
// the destination line into cache (read for ownership): for an output larger than the cache
// that is one more pass over memory than needed. Streaming stores skip it. Used only for
// large outputs (a small one is better left in cache for the next layer) and only at
// addresses aligned to the vector; `stream_fence()` makes them visible before the work
// they belong to is considered done.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cstdint>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace fastnorm::cpu {

// Outputs at least this large are written with streaming stores. A training step keeps
// several tensors of a layer's size live (input, output, gradients), so from a few MiB on
// they do not stay in a shared L3 anyway (measured, batch-norm fwd+bwd at 12.8 MB per tensor
// on a 32 MiB L3: 1.2x-1.8x faster at 8 MiB than at 16 MiB; at 6.4 MB a 4 MiB threshold
// is slower).
constexpr int64_t kStreamBytes = int64_t(8) << 20;

// Stores v at p: streaming when `stream` and p is aligned to the vector, else regular.
template <typename T>
inline void store_maybe_streaming(T* p, const at::vec::Vectorized<T>& v, bool stream) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  constexpr int64_t bytes = int64_t(sizeof(at::vec::Vectorized<T>));
  if (stream && reinterpret_cast<uintptr_t>(p) % bytes == 0) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, float>) {
      _mm512_stream_ps(reinterpret_cast<float*>(p), __m512(v));
    } else if constexpr (std::is_same_v<T, double>) {
      _mm512_stream_pd(reinterpret_cast<double*>(p), __m512d(v));
    } else {
      _mm512_stream_si512(reinterpret_cast<__m512i*>(p), __m512i(v));
    }
#else
    if constexpr (std::is_same_v<T, float>) {
      _mm256_stream_ps(reinterpret_cast<float*>(p), __m256(v));
    } else if constexpr (std::is_same_v<T, double>) {
      _mm256_stream_pd(reinterpret_cast<double*>(p), __m256d(v));
    } else {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(p), __m256i(v));
    }
#endif
    return;
  }
#endif
  (void)stream;
  v.store(p);
}

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

}  // namespace fastnorm::cpu
