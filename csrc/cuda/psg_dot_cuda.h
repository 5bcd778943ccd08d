// Host entry point of the CUDA per-sample-gradient dot product.
#pragma once

#include <cstdint>

#include "../common.h"

namespace torchfluence::cuda {

// scores[q, j] += <Q[q], sum_t D[j,t] A[j,t]^T> for one layer; launches on
// `stream` (a cudaStream_t) and returns without synchronising.
void psg_dot(const PsgDotArgs& args, std::uintptr_t stream);

}  // namespace torchfluence::cuda
