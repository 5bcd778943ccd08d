// Host entry point of the CPU per-sample-gradient dot product.
#pragma once

#include "../psg_dot_args.h"

namespace torchfluence::cpu {

// scores[q, j] += <Q[q], sum_t D[j,t] A[j,t]^T> for one captured layer, without
// writing the per-sample gradients anywhere but a packed cache-sized panel.
void psg_dot(const PsgDotArgs& args);

}  // namespace torchfluence::cpu
