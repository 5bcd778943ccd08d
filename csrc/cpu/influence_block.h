// Host entry points of the CPU kernels.
#pragma once

#include "../influence_block_args.h"

namespace torchfluence::cpu {

// Computes S @ G^T for one block of training rows and merges it into the
// running top-k (see InfluenceBlockArgs). Runs on the calling thread's OpenMP pool.
void influence_block(const InfluenceBlockArgs& args);

int max_threads();

}  // namespace torchfluence::cpu
