// Non-temporal ("streaming") stores for the CPU element passes. A regular store first reads
// the destination line into cache (read for ownership): for an output larger than the cache
// that is one more pass over memory than needed. Streaming stores skip it. Used only for
// large outputs (a small one is better left in cache for the next layer) and only at
// addresses aligned to the vector; `stream_fence()` makes them visible before the work
// they belong to is considered done.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace fastnorm::cpu {

// Outputs at least this large may be written with streaming stores (stream_output). A training step keeps
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

// FASTNORM_STREAM_STORES=always|never overrides stream_output's choice (for measurements
// and tests); unset or anything else: auto.
enum class StreamMode { Auto, Always, Never };
inline StreamMode stream_mode() {
  static const StreamMode mode = [] {
    const char* s = std::getenv("FASTNORM_STREAM_STORES");
    if (s != nullptr && std::strcmp(s, "always") == 0) return StreamMode::Always;
    if (s != nullptr && std::strcmp(s, "never") == 0) return StreamMode::Never;
    return StreamMode::Auto;
  }();
  return mode;
}

// Whether the page holding p is in memory. A large block fresh from the system (glibc's mmap
// for every block above its threshold: each large output of a plain process) is not, until
// its first touch faults and the kernel zeroes the page.
inline bool page_resident(const void* p) {
#if defined(__linux__)
  const uintptr_t page = uintptr_t(sysconf(_SC_PAGESIZE));
  unsigned char in_core = 0;
  void* start = reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(p) & ~(page - 1));
  return mincore(start, page, &in_core) != 0 || (in_core & 1) != 0;  // (unknown: as resident)
#else
  (void)p;
  return true;
#endif
}

// Asks the kernel for transparent huge pages over the whole 2 MiB blocks of [p, p + bytes)
// (a hint; with THP in "madvise" mode, as many systems set it, the default otherwise): each
// first touch then maps and zeroes 2 MiB, where 4 KiB pages fault 512 times as often.
inline void advise_huge_pages(const void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + uintptr_t(bytes)) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

// Whether to write an output of `bytes` at p with streaming stores: only a large one, and
// only onto pages already mapped. A large output on fresh pages gets huge pages instead
// (advise_huge_pages). On a fresh page the fault handler's zeroing has just put
// the page's lines in the cache; a streaming store to a cached line first evicts it, writing
// the zeros back, so each line costs two writes to memory and an eviction instead of the
// one write-back a regular store into the zeroed line gives. (The middle of the block is
// sampled: the allocator's header shares the first page.)
inline bool stream_output(const void* p, int64_t bytes) {
  if (bytes < kStreamBytes || p == nullptr) return false;
  switch (stream_mode()) {
    case StreamMode::Always:
      return true;
    case StreamMode::Never:
      return false;
    default:
      if (page_resident(static_cast<const char*>(p) + bytes / 2)) return true;
      advise_huge_pages(p, bytes);
      return false;
  }
}

inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

}  // namespace fastnorm::cpu
