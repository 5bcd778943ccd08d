// Host entry point of the CUDA sparse Johnson-Lindenstrauss projection.
#pragma once

#include <cstdint>

#include "../sjlt_args.h"

namespace torchfluence::cuda {

// out += G P[:, offset : offset + p_block]^T for one block of columns (see SjltArgs),
// bit for bit what the CPU kernel computes. Any number of rows (large calls go in
// several launches). Launches on `stream` (a cudaStream_t) and returns without
// synchronising.
void sjlt(const SjltArgs& args, std::uintptr_t stream);

}  // namespace torchfluence::cuda
