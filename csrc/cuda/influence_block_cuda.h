// Host entry points of the CUDA kernels (compiled only when CUDA is enabled).
#pragma once

#include <cstdint>
#include <string>

#include "../common.h"

namespace torchfluence::cuda {

// Largest k the fused epilogue keeps in shared memory (two lists of k per
// query row, for 64 rows per CTA). Larger k goes through the scores path.
constexpr std::int64_t kMaxFusedTopK = 32;

// How many column splits (CTAs along the training rows) a call will use; the
// caller allocates a workspace of 2 * n_query * splits * k * (sizeof(acc) + 8)
// bytes for them.
int influence_block_splits(std::int64_t n_query, std::int64_t b, std::int64_t k, int num_sms);

// Launches on `stream` (a cudaStream_t); returns without synchronising.
void influence_block(const InfluenceBlockArgs& args, std::uintptr_t workspace, int splits, std::uintptr_t stream);

std::string runtime_version();

}  // namespace torchfluence::cuda
