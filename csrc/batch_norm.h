// Batch-norm kernel interface shared by the op front (batch_norm.cpp) and the device files.
// The front validates, brings every full-size tensor into one dense layout and every
// per-channel tensor to the accumulation dtype, so the kernels see only these structs.
#pragma once

#include <ATen/core/Tensor.h>

#include "common/batch_norm_math.h"

namespace fastnorm {

// A dense batch-norm tensor is either planar, (N, C, S) contiguous with S the product of
// the spatial sizes, or channels-innermost, N*S rows of C values (channels_last,
// channels_last_3d, (N, C) and transposed (N, L, C) views).
struct Layout {
  int64_t N = 0;
  int64_t C = 0;
  int64_t S = 1;
  bool channels_last = false;

  int64_t count() const { return N * S; }  // values per channel
  int64_t numel() const { return N * C * S; }
};

// What the element-wise passes need, forward and backward. Per-channel tensors (weight,
// bias, mean, var) are contiguous in the accumulation dtype (float64 for float64 input,
// float32 otherwise); weight and bias may be undefined (affine=False).
struct NormArgs {
  Layout layout;
  at::Tensor input;
  at::Tensor weight;
  at::Tensor bias;
  at::Tensor residual;  // same layout as input, or undefined
  at::Tensor mean;
  at::Tensor var;       // biased variance
  double eps = 1e-5;
  Activation act = Activation::None;
  double slope = 0.01;
};

// Training forward: statistics into mean/var, running statistics updated, output written.
struct TrainArgs : NormArgs {
  at::Tensor output;
  at::Tensor running_mean;  // accumulation dtype, or undefined
  at::Tensor running_var;
  at::Tensor num_batches_tracked;  // int64 [1] or [], or undefined
  double momentum = 0.1;
  bool cumulative = false;  // momentum=None: factor 1 / num_batches_tracked
};

// Backward. `output` is the saved forward output (read when the activation's derivative
// comes from it), grad tensors are undefined when not wanted. In training, mean_dz and
// mean_dz_xmu are either computed here (fused) or given (synchronized batch norm).
struct BackwardArgs : NormArgs {
  at::Tensor grad_out;
  at::Tensor output;
  bool training = true;
  at::Tensor grad_input;
  at::Tensor grad_preact;  // gradient at the pre-activation (= grad of the residual)
  at::Tensor grad_weight;  // [C] accumulation dtype, written by the fused backward
  at::Tensor grad_bias;
  at::Tensor sum_dz;       // [C] accumulation dtype, written by backward_reduce
  at::Tensor sum_dz_xmu;
  at::Tensor mean_dz;      // [C] given to backward_elemt
  at::Tensor mean_dz_xmu;
};

// Device kernels, one set per backend.
#define FASTNORM_DECLARE_BATCH_NORM_KERNELS                                   \
  void batch_norm_stats(const NormArgs& a);      /* writes a.mean, a.var */   \
  void batch_norm_train(const TrainArgs& a);                                  \
  void batch_norm_elemt(const NormArgs& a, const at::Tensor& output);         \
  void batch_norm_backward(const BackwardArgs& a); /* reduce + elemt */       \
  void batch_norm_backward_reduce(const BackwardArgs& a);                     \
  void batch_norm_backward_elemt(const BackwardArgs& a);

namespace cpu {
FASTNORM_DECLARE_BATCH_NORM_KERNELS
}
namespace cuda {
FASTNORM_DECLARE_BATCH_NORM_KERNELS
}

}  // namespace fastnorm
