// Batch-norm math shared by the CPU and the CUDA kernels: per-channel moments and their
// exact merge, the fused activation, and the per-channel coefficients of the forward and
// backward element-wise passes. Everything here is plain arithmetic so that it compiles
// for host and device alike, and the CPU tests cover it.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#define FASTNORM_HD C10_HOST_DEVICE

namespace fastnorm {

// exp and sqrt for host and device code alike.
FASTNORM_HD inline float fn_exp(float x) { return ::expf(x); }
FASTNORM_HD inline double fn_exp(double x) { return ::exp(x); }
FASTNORM_HD inline float fn_sqrt(float x) { return ::sqrtf(x); }
FASTNORM_HD inline double fn_sqrt(double x) { return ::sqrt(x); }
FASTNORM_HD inline float fn_erf(float x) { return ::erff(x); }
FASTNORM_HD inline double fn_erf(double x) { return ::erf(x); }
FASTNORM_HD inline double fn_tanh(double x) { return ::tanh(x); }
FASTNORM_HD inline float fn_expm1(float x) { return ::expm1f(x); }
FASTNORM_HD inline double fn_expm1(double x) { return ::expm1(x); }

// a / b and 1 / sqrt(x). On the device, in float32, the hardware's division (within 2 ulp)
// and rsqrt, as torch's own CUDA batch norm uses: the IEEE forms call slow-path
// subroutines whose register saves would show as spills in the kernels. The divisors here
// are counts, count ratios and 1 + exp(-z), far from the range where they differ.
template <typename T>
FASTNORM_HD inline T fn_div(T a, T b) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(T) == sizeof(float)) {
    return __fdividef(a, b);
  } else {
    return a / b;
  }
#else
  return a / b;
#endif
}

// tanh; on the device in float32 as 1 - 2 / (1 + exp(2x)), with the hardware's division:
// tanhf's longer sequence spilled registers in the fused kernels.
FASTNORM_HD inline float fn_tanh(float x) {
#if defined(__CUDA_ARCH__)
  return 1.0f - fn_div(2.0f, 1.0f + ::expf(2.0f * x));
#else
  return ::tanhf(x);
#endif
}

template <typename T>
FASTNORM_HD inline T fn_rsqrt(T x) {
#if defined(__CUDA_ARCH__)
  return ::rsqrt(x);
#else
  return T(1) / fn_sqrt(x);
#endif
}

// Activation applied after the (optional) residual add. Values match the Python side.
// The fused activations, as torch's: relu6 = hardtanh(0, 6), gelu with erf, gelu_tanh
// (approximate="tanh"), elu with alpha 1.
enum class Activation : int64_t {
  None = 0,
  ReLU = 1,
  LeakyReLU = 2,
  SiLU = 3,
  ReLU6 = 4,
  HardSwish = 5,
  GELU = 6,
  GELUTanh = 7,
  ELU = 8,
};
constexpr int64_t kActivations = 9;

// Calls f(std::integral_constant<Activation, act>{}) (host side): one kernel instance per
// activation.
template <typename F>
void with_activation(Activation act, F&& f) {
  using A = Activation;
  switch (act) {
    case A::ReLU:
      return f(std::integral_constant<A, A::ReLU>{});
    case A::LeakyReLU:
      return f(std::integral_constant<A, A::LeakyReLU>{});
    case A::SiLU:
      return f(std::integral_constant<A, A::SiLU>{});
    case A::ReLU6:
      return f(std::integral_constant<A, A::ReLU6>{});
    case A::HardSwish:
      return f(std::integral_constant<A, A::HardSwish>{});
    case A::GELU:
      return f(std::integral_constant<A, A::GELU>{});
    case A::GELUTanh:
      return f(std::integral_constant<A, A::GELUTanh>{});
    case A::ELU:
      return f(std::integral_constant<A, A::ELU>{});
    default:
      return f(std::integral_constant<A, A::None>{});
  }
}

// Count, mean and sum of squared deviations (M2) of a set of values. Two summaries merge
// exactly (Chan, Golub & LeVeque), so partial results from threads, blocks or processes
// combine without the cancellation of E[x^2] - E[x]^2.
template <typename T>
struct Moments {
  T count;
  T mean;
  T m2;
};

// Whether x is finite (x - x is NaN for an infinity or a NaN), in host and device code.
template <typename T>
FASTNORM_HD inline bool is_finite(T x) {
  return x - x == T(0);
}

// Non-finite values propagate as through torch's sums: a mean with an infinity is that
// infinity (inf + inf is inf, where the difference of two such means is NaN), and a variance
// with one is NaN.
template <typename T>
FASTNORM_HD inline Moments<T> moments_merge(const Moments<T>& a, const Moments<T>& b) {
  const T n = a.count + b.count;
  if (n == T(0)) {
    return a;
  }
  const T delta = b.mean - a.mean;
  const T b_share = fn_div(b.count, n);
  if (!is_finite(delta)) {
    return {n, fn_div(a.count * a.mean + b.count * b.mean, n), delta - delta};
  }
  return {n, a.mean + delta * b_share, a.m2 + b.m2 + delta * delta * a.count * b_share};
}

// Moments of the union of k sets, for `width` columns at once: in column j, set i has
// count[i] values with mean mean[i * stride + j] and M2 m2[i * stride + j]. The exact
// two-pass combination, the mean first and then M2 with the squared deviations of the set
// means (one division per column instead of k - 1 pairwise merges), walked set by set so
// that each pass reads contiguous columns. Writes out_mean, out_m2 [width]; returns the
// count.
template <typename T>
FASTNORM_HD inline T moments_combine(const T* count, const T* mean, const T* m2, int64_t k, int64_t width,
                                     int64_t stride, T* out_mean, T* out_m2) {
  T n = 0;
  for (int64_t i = 0; i < k; ++i) n += count[i];
  for (int64_t j = 0; j < width; ++j) out_mean[j] = out_m2[j] = T(0);
  if (n == T(0)) return n;
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t j = 0; j < width; ++j) out_mean[j] += count[i] * mean[i * stride + j];
  }
  for (int64_t j = 0; j < width; ++j) out_mean[j] = fn_div(out_mean[j], n);
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t j = 0; j < width; ++j) {
      const T d = mean[i * stride + j] - out_mean[j];
      out_m2[j] += m2[i * stride + j] + count[i] * d * d;
    }
  }
  return n;
}

// Welford's update with one value.
template <typename T>
FASTNORM_HD inline Moments<T> moments_add(const Moments<T>& a, T x) {
  const T n = a.count + T(1);
  const T delta = x - a.mean;
  const T mean = a.mean + fn_div(delta, n);
  return {n, mean, a.m2 + delta * (x - mean)};
}

// A pivot for shifted sums: a finite value, else 0 (an infinite pivot would turn every
// deviation from it into NaN, where torch's sums give the infinity).
template <typename T>
FASTNORM_HD inline T finite_pivot(T x) {
  return is_finite(x) ? x : T(0);
}

// Moments of n values from the shifted sums sd = sum(x - m) and sdd = sum((x - m)^2) around
// a provisional mean m (the corrected two-pass algorithm: exact when m is the true mean,
// and the correction term removes the error of a rounded m).
template <typename T>
FASTNORM_HD inline Moments<T> moments_from_shifted_sums(T n, T m, T sd, T sdd) {
  if (n == T(0)) {
    return {T(0), T(0), T(0)};
  }
  const T m2 = sdd - fn_div(sd * sd, n);
  return {n, m + fn_div(sd, n), m2 < T(0) ? T(0) : m2};  // (a NaN stays NaN)
}

template <typename T>
FASTNORM_HD inline T biased_var(const Moments<T>& m) {
  return m.count > T(0) ? fn_div(m.m2, m.count) : T(0);
}

template <typename T>
FASTNORM_HD inline T inv_std(T var, double eps) {
  return fn_rsqrt(var + T(eps));
}

// Running statistics: exponential average with `factor` (momentum), the variance entering
// it unbiased (n / (n - 1)), as torch does.
template <typename T>
FASTNORM_HD inline T running_mean_update(T running, T batch_mean, T factor) {
  return running + factor * (batch_mean - running);
}

template <typename T>
FASTNORM_HD inline T running_var_update(T running, T batch_biased_var, T count, T factor) {
  const T unbiased = count > T(1) ? batch_biased_var * fn_div(count, count - T(1)) : batch_biased_var;
  return running + factor * (unbiased - running);
}

// Forward per channel: z = x * scale + shift (+ residual), y = act(z), with
// scale = weight * invstd and shift = bias - mean * scale. With an FMA the only rounding
// beyond the result's is that of shift, |mean * scale| * eps, the same as that of
// (x - mean) * scale with a rounded mean; computed in float64 (as the CPU does) it is gone.
template <typename T>
struct ForwardCoef {
  T scale;
  T shift;
};

template <typename T>
FASTNORM_HD inline ForwardCoef<T> forward_coef(T mean, T invstd, T weight, T bias) {
  const T scale = weight * invstd;
  return {scale, bias - mean * scale};
}

// Whether the activation's derivative needs the pre-activation z; otherwise it can be read
// off the output y (relu, and leaky relu with a non-negative slope, keep the sign of z).
// relu6 needs z: a half or bfloat16 output rounds values just below 6 up to 6.
FASTNORM_HD inline bool activation_needs_z(Activation act, double slope) {
  return act == Activation::SiLU || act == Activation::ReLU6 || act == Activation::HardSwish ||
         act == Activation::GELU || act == Activation::GELUTanh || act == Activation::ELU ||
         (act == Activation::LeakyReLU && slope < 0.0);
}

// GELU's constants: 1 / sqrt(2), 1 / sqrt(2 pi), sqrt(2 / pi) and the tanh form's cubic term.
constexpr double kInvSqrt2 = 0.70710678118654752440;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;
constexpr double kSqrt2OverPi = 0.79788456080286535588;
constexpr double kGeluCubic = 0.044715;

template <typename T>
FASTNORM_HD inline T sigmoid(T z) {
  return fn_div(T(1), T(1) + fn_exp(-z));
}

template <typename T>
FASTNORM_HD inline T activate(T z, Activation act, T slope) {
  switch (act) {
    case Activation::ReLU:
      return z > T(0) ? z : T(0);
    case Activation::LeakyReLU:
      return z > T(0) ? z : z * slope;
    case Activation::SiLU:
      return z * sigmoid(z);
    case Activation::ReLU6:
      return z <= T(0) ? T(0) : (z >= T(6) ? T(6) : z);  // (a NaN stays NaN)
    case Activation::HardSwish:
    {  // z * min(max(z + 3, 0), 6) / 6, as torch's (a NaN stays NaN)
      const T r = z + T(3);
      return fn_div(z * (r <= T(0) ? T(0) : (r >= T(6) ? T(6) : r)), T(6));
    }
    case Activation::GELU:
      return T(0.5) * z * (T(1) + fn_erf(z * T(kInvSqrt2)));
    case Activation::GELUTanh:
      return T(0.5) * z * (T(1) + fn_tanh(T(kSqrt2OverPi) * (z + T(kGeluCubic) * z * z * z)));
    case Activation::ELU:
      return z > T(0) ? z : fn_expm1(z);
    default:
      return z;
  }
}

// d act / d z times dy, with `v` the pre-activation z when activation_needs_z, else the
// output y.
template <typename T>
FASTNORM_HD inline T activation_backward(T dy, T v, Activation act, T slope) {
  switch (act) {
    case Activation::ReLU:
      return v <= T(0) ? T(0) : dy;  // a NaN passes dy, as torch's threshold_backward
    case Activation::LeakyReLU:
      return v > T(0) ? dy : dy * slope;
    case Activation::SiLU: {
      const T s = sigmoid(v);
      return dy * s * (T(1) + v * (T(1) - s));
    }
    case Activation::ReLU6:  // as torch's vectorized hardtanh_backward (a NaN gives 0)
      return (v > T(0) && v < T(6)) ? dy : T(0);
    case Activation::HardSwish:
      return v < T(-3) ? T(0) : (v <= T(3) ? dy * (fn_div(v, T(3)) + T(0.5)) : dy);
    case Activation::GELU:
      return dy * (T(0.5) * (T(1) + fn_erf(v * T(kInvSqrt2))) + v * fn_exp(T(-0.5) * v * v) * T(kInvSqrt2Pi));
    case Activation::GELUTanh: {
      const T inner = T(kSqrt2OverPi) * (v + T(kGeluCubic) * v * v * v);
      const T t = fn_tanh(inner);
      const T d_inner = T(kSqrt2OverPi) * (T(1) + T(3 * kGeluCubic) * v * v);
      return dy * (T(0.5) * (T(1) + t) + T(0.5) * v * (T(1) - t * t) * d_inner);
    }
    case Activation::ELU:  // (a NaN passes dy, as torch's elu_backward)
      return v <= T(0) ? dy * fn_exp(v) : dy;
    default:
      return dy;
  }
}

// Backward per channel: dx = (dz - mean_dz) * k_dz + (x - mean) * k_x, where dz is the
// gradient at the pre-activation. In training the batch statistics depend on x:
//   dx = w * invstd * (dz - mean(dz) - (x - mean) * invstd^2 * mean(dz * (x - mean)));
// in evaluation they are constants and dx = w * invstd * dz (mean_dz = k_x = 0). Both
// differences are taken before their products, as torch's: folded into one constant
// (dz * k_dz + x * k_x + c) they cancel afterwards, and the gradient's error grew with
// mean / std and with mean(dz) / dz.
template <typename T>
struct BackwardCoef {
  T k_dz;
  T k_x;
  T mean_dz;
};

template <typename T>
FASTNORM_HD inline BackwardCoef<T> backward_coef(T invstd, T weight, bool training, T mean_dz, T mean_dz_xmu) {
  const T k = weight * invstd;
  if (!training) {
    return {k, T(0), T(0)};
  }
  return {k, -k * invstd * invstd * mean_dz_xmu, mean_dz};
}

// Parameter gradients from the two per-channel sums.
template <typename T>
FASTNORM_HD inline T grad_weight_from_sums(T sum_dz_xmu, T invstd) {
  return sum_dz_xmu * invstd;
}

}  // namespace fastnorm
