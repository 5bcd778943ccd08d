// Arguments of linear_head_hvp (csrc/cpu/linear_head.cpp, csrc/cuda/linear_head.cu).
#pragma once

#include <cstdint>

#include "common.h"

namespace torchfluence {

// Loss of a linear head, for its closed-form curvature. Values match `_LOSS_CODES` in
// python/torchfluence/ops/linear_head.py.
enum class HeadLoss : int { CrossEntropy = 0, MSE = 1, BCEWithLogits = 2 };

// Hessian-vector products of a linear head's mean loss: out[v] = (1/n_total) sum_i h_i (V[v] x~_i) x~_i^T
// over the n samples of this call, accumulated into out.
struct LinearHeadArgs {
  DType dtype = DType::Float32;  // of every tensor (float32 or float64)
  HeadLoss loss = HeadLoss::CrossEntropy;
  MatrixRef features;            // X [n, d]
  MatrixRef weight;              // W [C, d]
  VectorRef bias;                // b [C], contiguous, or data == 0 (then V and out have no bias column)
  Tensor3Ref vectors;            // V [k, C, d1] contiguous, d1 = d + (bias present)
  Tensor3Ref out;                // [k, C, d1] contiguous, accumulated into
  std::int64_t n_total = 0;      // the divisor (all samples of the mean, over every call)
  std::uintptr_t workspace = 0;  // CUDA only: n * C + k * n * C elements of the dtype
  std::int64_t workspace_bytes = 0;
  TORCHFLUENCE_HOST_DEVICE std::int64_t k() const { return vectors.n; }
  TORCHFLUENCE_HOST_DEVICE bool has_bias() const { return bias.data != 0; }
};

}  // namespace torchfluence
