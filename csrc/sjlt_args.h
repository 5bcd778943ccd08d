// Arguments of sjlt (csrc/cpu/sjlt.cpp, csrc/cuda/sjlt.cu); the hash that defines P is in sjlt.h.
#pragma once

#include <cstdint>

#include "common.h"

namespace torchfluence {

// s is bounded so the CUDA kernel's per-tile bucket codes fit its shared memory;
// k so that a bucket with its sign bit fits a non-negative int32 code.
constexpr std::int64_t kSjltMaxS = 64;
constexpr std::int64_t kSjltMaxK = std::int64_t(1) << 30;

// out[r, b] += sum_c P[b, offset + c] * G[r, c] for one block of columns of G.
//
// Every output is accumulated in ascending global column order, starting from
// its value in `out`, with the terms +-(scale * G[r, c]) rounded in the
// accumulation dtype (scale = 1/sqrt(s)). Both kernels follow exactly that
// order, so they give the same bits, and projecting a vector in column blocks
// (in order) gives the same bits as projecting it in one call.
struct SjltArgs {
  DType dtype = DType::Float32;  // of input; out is in accumulation_dtype(dtype)
  MatrixRef input;               // G [n, p_block], any non-negative strides
  std::int64_t offset = 0;       // global column index of G's column 0
  std::int64_t s = 1;            // non-zeros per column, 1 <= s <= min(k, kSjltMaxS)
  std::uint64_t seed = 0;
  MatrixRef out;                 // [n, k], k <= kSjltMaxK, non-overlapping strides, accumulated into (+=)
};

}  // namespace torchfluence
