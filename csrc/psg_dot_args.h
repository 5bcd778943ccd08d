// Arguments of psg_dot (csrc/cpu/psg_dot.cpp, csrc/cuda/psg_dot.cu).
#pragma once

#include <cstdint>

#include "common.h"

namespace torchfluence {

// One captured layer for psg_dot: scores[q, j] += sum_t D[j,t]^T Q[q] A[j,t].
struct PsgDotArgs {
  DType dtype = DType::Float32;  // of queries, activations and output_grads
  MatrixRef queries;             // Q [n_query, d_out * d_in], each row a row-major (d_out, d_in) matrix
  Tensor3Ref activations;        // A [b, T, d_in]
  Tensor3Ref output_grads;       // D [b, T, d_out]
  MatrixRef scores;              // out [n_query, b], accumulation dtype, accumulated into (+=)
};

}  // namespace torchfluence
