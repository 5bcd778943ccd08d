// Arguments of topk_merge (csrc/cpu/topk_merge.cpp, csrc/cuda/topk_merge.cu).
#pragma once

#include <cstdint>

#include "common.h"

namespace torchfluence {

// One block of precomputed scores merged into a running top-k.
struct TopKMergeArgs {
  MatrixRef scores;          // [n_query, b] float32 or float64, any strides
  std::int64_t offset = 0;   // global index of column 0
  TopKRef topk;              // values in the dtype of scores, k >= 1
  // int64[3]: count of non-finite scores seen, query row and global index of the
  // first one (row-major within a call, the earliest call first). Accumulates.
  VectorRef status;
};

}  // namespace torchfluence
