// Host entry point of the CUDA closed-form linear-head HVP.
#pragma once

#include <cstdint>

#include "../common.h"

namespace torchfluence::cuda {

// See LinearHeadArgs; needs its workspace. Launches on `stream`, does not synchronise.
void linear_head_hvp(const LinearHeadArgs& args, std::uintptr_t stream);

}  // namespace torchfluence::cuda
