// Host entry point of the CUDA topk_merge.
#pragma once

#include <cstdint>

#include "../topk_merge_args.h"

namespace torchfluence::cuda {

// Bytes of device workspace one call needs (non-finite counters, zeroed by the call).
constexpr std::int64_t kTopKMergeWorkspaceBytes = 3 * 8;

// Merges one block of scores into the running top-k (see TopKMergeArgs).
// Launches on `stream` (a cudaStream_t) and returns without synchronising.
void topk_merge(const TopKMergeArgs& args, std::uintptr_t workspace, std::uintptr_t stream);

}  // namespace torchfluence::cuda
