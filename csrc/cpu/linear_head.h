// Host entry point of the CPU closed-form linear-head HVP.
#pragma once

#include "../linear_head_args.h"

namespace torchfluence::cpu {

// out[v] += (1/n_total) sum_i h_i (V[v] x~_i) x~_i^T (see LinearHeadArgs): logits, the
// loss's Hessian in the logits and both products, fused, one pass over the samples.
void linear_head_hvp(const LinearHeadArgs& args);

}  // namespace torchfluence::cpu
