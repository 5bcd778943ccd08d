// Host entry point of the CUDA per-sample-gradient dot product.
#pragma once

#include <cstdint>

#include "../psg_dot_args.h"

namespace torchfluence::cuda {

// Launch bounds: 32 queries per CTA along grid.y (at most 65535 CTAs), 32
// samples per CTA along grid.x.
constexpr std::int64_t kPsgDotMaxQueryRows = 65535LL * 32;
constexpr std::int64_t kPsgDotMaxSamples = 2147483647LL * 32;

// scores[q, j] += <Q[q], sum_t D[j,t] A[j,t]^T> for one layer; launches on
// `stream` (a cudaStream_t) and returns without synchronising.
void psg_dot(const PsgDotArgs& args, std::uintptr_t stream);

}  // namespace torchfluence::cuda
