// Shared types for the kernels: raw views of caller-owned memory.
//
// The extension never links libtorch. Python allocates every tensor and
// passes data pointers, shapes and strides (in elements), so one build loads
// under any torch release.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace torchfluence {

// Element types the kernels understand. Values match `_ops._DTYPE_CODES`.
enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3 };

// A strided 2-D view of caller memory: element (r, c) lives at
// data + r * stride_row + c * stride_col (strides in elements, may be 0 for
// broadcast rows). `data == 0` means "absent" for optional outputs.
struct MatrixRef {
  std::uintptr_t data = 0;
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  std::int64_t stride_row = 0;
  std::int64_t stride_col = 0;
};

// Running per-query top-k state, each array contiguous [n_query, k].
// Slots not yet filled hold index -1 and sort after every real entry.
struct TopKRef {
  std::int64_t k = 0;                    // 0: no top-k requested
  std::uintptr_t largest_values = 0;     // [n_query, k] accumulation dtype
  std::uintptr_t largest_indices = 0;    // [n_query, k] int64
  std::uintptr_t smallest_values = 0;    // [n_query, k] accumulation dtype
  std::uintptr_t smallest_indices = 0;   // [n_query, k] int64
};

// Everything one call of influence_block needs.
struct InfluenceBlockArgs {
  DType dtype = DType::Float32;  // of queries and train
  MatrixRef queries;             // S [n_query, p]
  MatrixRef train;               // G [b, p]
  std::int64_t offset = 0;       // global index of G's first row
  MatrixRef scores;              // optional out [n_query, b], accumulation dtype
  TopKRef topk;
  // int64[3]: number of non-finite scores seen, and the query row and global
  // training index of one of them. Accumulates across calls.
  std::uintptr_t status = 0;
};

// A strided 3-D view [n, t, d] of caller memory (strides in elements).
struct Tensor3Ref {
  std::uintptr_t data = 0;
  std::int64_t n = 0, t = 0, d = 0;
  std::int64_t stride_n = 0, stride_t = 0, stride_d = 0;
};

// One captured layer for psg_dot: scores[q, j] += sum_t D[j,t]^T Q[q] A[j,t].
struct PsgDotArgs {
  DType dtype = DType::Float32;  // of queries, activations and output_grads
  MatrixRef queries;             // Q [n_query, d_out * d_in], each row a row-major (d_out, d_in) matrix
  Tensor3Ref activations;        // A [b, T, d_in]
  Tensor3Ref output_grads;       // D [b, T, d_out]
  MatrixRef scores;              // out [n_query, b], accumulated into (+=)
};

// Loss of a linear head, for its closed-form curvature. Values match `_ops._HEAD_LOSS_CODES`.
enum class HeadLoss : int { CrossEntropy = 0, MSE = 1, BCEWithLogits = 2 };

// Hessian-vector products of a linear head's mean loss: out[v] = (1/n_total) sum_i h_i (V[v] x~_i) x~_i^T
// over the n samples of this call, accumulated into out.
struct LinearHeadArgs {
  DType dtype = DType::Float32;  // of every tensor (float32 or float64)
  HeadLoss loss = HeadLoss::CrossEntropy;
  MatrixRef features;            // X [n, d]
  MatrixRef weight;              // W [C, d]
  std::uintptr_t bias = 0;       // b [C], contiguous, or 0 (then V and out have no bias column)
  std::uintptr_t vectors = 0;    // V [k, C, d1] contiguous, d1 = d + (bias != 0)
  std::uintptr_t out = 0;        // [k, C, d1] contiguous, accumulated into
  std::int64_t k = 0;
  std::int64_t n_total = 0;      // the divisor (all samples of the mean, over every call)
  std::uintptr_t workspace = 0;  // CUDA only: n * C + k * n * C elements of the dtype
};

inline void check(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

}  // namespace torchfluence
