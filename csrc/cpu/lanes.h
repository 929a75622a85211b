// Vector helpers of the CPU kernels: values of any floating type loaded and stored as
// vectors of their accumulation type (float32 for float16/bfloat16), and a span loop with
// four independent accumulators for the reductions.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <type_traits>

#include "cpu/stream_store.h"

// Forces a lambda inline where it is called (kernels pass small per-slice lambdas to
// generic loops; called, each costs a call, a vzeroupper and reloads of its captures).
#if defined(__GNUC__) || defined(__clang__)
#define FASTNORM_INLINE_LAMBDA __attribute__((always_inline))
#else
#define FASTNORM_INLINE_LAMBDA
#endif

namespace fastnorm::cpu {

using at::vec::Vectorized;

// Loads and stores kWidth values of scalar_t as kVecs vectors of the accumulation type; a
// count n of type int64_t means a partial vector, std::integral_constant a full one.
template <typename scalar_t>
struct Lanes {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t kVecs = Vectorized<scalar_t>::size() / Vec::size();
  static constexpr int64_t kWidth = Vectorized<scalar_t>::size();
  using Full = std::integral_constant<int64_t, kWidth>;
  static_assert(kVecs == 1 || kVecs == 2, "unexpected vector width");

  template <class N>
  C10_ALWAYS_INLINE static void load(const scalar_t* p, Vec* out, N n) {
    constexpr bool full = !std::is_same_v<N, int64_t>;
    if constexpr (kVecs == 1) {
      out[0] = full ? Vec::loadu(p) : Vec::loadu(p, n);
    } else {
      const auto v = full ? Vectorized<scalar_t>::loadu(p) : Vectorized<scalar_t>::loadu(p, n);
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(v);
      out[0] = lo;
      out[1] = hi;
    }
  }
  // `stream`: a streaming store where p allows (see stream_store.h).
  template <class N>
  C10_ALWAYS_INLINE static void store(scalar_t* p, const Vec* in, N n, bool stream = false) {
    constexpr bool full = !std::is_same_v<N, int64_t>;
    if constexpr (kVecs == 1) {
      if constexpr (full) {
        store_maybe_streaming(p, in[0], stream);
      } else {
        in[0].store(p, n);
      }
    } else {
      const auto v = from_float(in[0], in[1]);
      if constexpr (full) {
        store_maybe_streaming(p, v, stream);
      } else {
        v.store(p, n);
      }
    }
  }
  // Two vectors of the accumulation type as one of scalar_t, rounded as at::vec rounds.
  C10_ALWAYS_INLINE static Vectorized<scalar_t> from_float(const Vec& a, const Vec& b) {
#if defined(FASTNORM_AVX512_BF16)
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      // One instruction for the 32 values, where at::vec's rounding takes sixteen. It flushes
      // subnormal inputs to zero and keeps NaN payloads (at::vec writes 0xffff), so a vector
      // holding either goes through at::vec: the same bits either way.
      constexpr int kNaNOrSubnormal = 0x01 | 0x20 | 0x80;  // quiet NaN, subnormal, signaling NaN
      if (!(_mm512_fpclass_ps_mask(a, kNaNOrSubnormal) | _mm512_fpclass_ps_mask(b, kNaNOrSubnormal))) {
        return Vectorized<scalar_t>((__m512i)_mm512_cvtne2ps_pbh(b, a));  // (b fills the upper half)
      }
    }
#endif
    return at::vec::convert_from_float<scalar_t>(a, b);
  }
  // Vector i of a block of n values, its missing lanes zeroed (a no-op for full blocks).
  template <class N>
  static inline Vec valid(const Vec& v, int64_t i, N n) {
    if constexpr (!std::is_same_v<N, int64_t>) {
      return v;
    } else {
      const int64_t k = n - i * Vec::size();
      if (k >= Vec::size()) return v;
      return k <= 0 ? Vec(0) : Vec::set(Vec(0), v, k);
    }
  }
};

// Runs body(i, count) over a span of n values in vector steps, unrolled by 4 for the
// reductions' independent accumulators: count is Full for whole vectors, an int64_t for
// the last, partial one; u (0..3) names the accumulator. Always inlined: the body's
// captures then live in registers; called, they stay in memory and are loaded again after
// every vector store (the intrinsics' stores may alias anything).
template <int64_t KW, typename Body>
C10_ALWAYS_INLINE void span_loop(int64_t n, Body&& body) {
  using Full = std::integral_constant<int64_t, KW>;
  int64_t i = 0;
  for (; i + 4 * KW <= n; i += 4 * KW) {
    body(i, Full{}, std::integral_constant<int, 0>{});
    body(i + KW, Full{}, std::integral_constant<int, 1>{});
    body(i + 2 * KW, Full{}, std::integral_constant<int, 2>{});
    body(i + 3 * KW, Full{}, std::integral_constant<int, 3>{});
  }
  for (; i + KW <= n; i += KW) body(i, Full{}, std::integral_constant<int, 0>{});
  if (i < n) body(i, n - i, std::integral_constant<int, 1>{});
}

// Totals of Vec::size() vectors: lane r of the result is the sum of the lanes of acc[r]
// (acc is overwritten). With AVX512, a tree of pairwise lane sums that halves the vectors
// at each level: about three operations a vector, where each vector's own horizontal sum
// takes eight, in a chain of dependent steps. Elsewhere each vector is summed in turn.
template <typename A>
C10_ALWAYS_INLINE Vectorized<A> lane_totals(Vectorized<A>* acc) {
  constexpr int R = Vectorized<A>::size();
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<A, float>) {
    // Lanes 0-7 take pairs of x's lanes, 8-15 pairs of y's: after level k, each row's
    // partial sums sit in 16 / 2^k adjacent lanes, and after the last, row r in lane r.
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    for (int n = R; n > 1; n /= 2) {
      for (int i = 0; i < n / 2; ++i) {
        const __m512 x = acc[2 * i], y = acc[2 * i + 1];
        acc[i] = _mm512_add_ps(_mm512_permutex2var_ps(x, even, y), _mm512_permutex2var_ps(x, odd, y));
      }
    }
    return acc[0];
  } else if constexpr (std::is_same_v<A, double>) {
    const __m512i even = _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14);
    const __m512i odd = _mm512_setr_epi64(1, 3, 5, 7, 9, 11, 13, 15);
    for (int n = R; n > 1; n /= 2) {
      for (int i = 0; i < n / 2; ++i) {
        const __m512d x = acc[2 * i], y = acc[2 * i + 1];
        acc[i] = _mm512_add_pd(_mm512_permutex2var_pd(x, even, y), _mm512_permutex2var_pd(x, odd, y));
      }
    }
    return acc[0];
  }
#endif
  A t[R];
  for (int r = 0; r < R; ++r) t[r] = at::vec::vec_reduce_all<A>([](Vectorized<A> a, Vectorized<A> b) { return a + b; }, acc[r]);
  return Vectorized<A>::loadu(t);
}

}  // namespace fastnorm::cpu
