// Host entry point of the CPU sparse Johnson-Lindenstrauss projection.
#pragma once

#include "../sjlt_args.h"

namespace torchfluence::cpu {

// out += G P[:, offset : offset + p_block]^T for one block of columns (see SjltArgs).
void sjlt(const SjltArgs& args);

}  // namespace torchfluence::cpu
