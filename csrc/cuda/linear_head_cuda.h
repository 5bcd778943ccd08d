// Host entry point of the CUDA closed-form linear-head HVP.
#pragma once

#include <cstdint>

#include "../linear_head_args.h"

namespace torchfluence::cuda {

// Launch bounds: one CTA row per (vector, class) (grid.y), and one thread per
// (vector, sample) in blocks of 256 (grid.x).
constexpr std::int64_t kHeadMaxVectorClasses = 65535;
constexpr std::int64_t kHeadMaxVectorSamples = 2147483647LL * 256;

// See LinearHeadArgs; needs its workspace. Launches on `stream`, does not synchronise.
void linear_head_hvp(const LinearHeadArgs& args, std::uintptr_t stream);

}  // namespace torchfluence::cuda
