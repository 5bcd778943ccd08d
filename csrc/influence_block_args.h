// Arguments of influence_block (csrc/cpu/influence_block.cpp, csrc/cuda/influence_block.cu).
#pragma once

#include <cstdint>

#include "common.h"

namespace torchfluence {

// Everything one call of influence_block needs.
struct InfluenceBlockArgs {
  DType dtype = DType::Float32;  // of queries and train
  MatrixRef queries;             // S [n_query, p]
  MatrixRef train;               // G [b, p]
  std::int64_t offset = 0;       // global index of G's first row
  MatrixRef scores;              // optional out [n_query, b], accumulation dtype, any non-overlapping strides
  TopKRef topk;                  // k >= 1
  // int64[3]: number of non-finite scores seen, and the query row and global
  // training index of one of them. Accumulates across calls.
  VectorRef status;
};

}  // namespace torchfluence
