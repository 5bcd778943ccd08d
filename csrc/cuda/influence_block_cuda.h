// Host entry points of the CUDA kernels (compiled only when CUDA is enabled).
#pragma once

#include <cstdint>
#include <string>

#include "../influence_block_args.h"

namespace torchfluence::cuda {

// Largest k the fused epilogue keeps in shared memory (two lists of k per
// query row, for 64 rows per CTA). Larger k goes through the scores path.
constexpr std::int64_t kMaxFusedTopK = 32;

// Dynamic shared memory (bytes) the fused kernel needs for k kept per side with
// acc_bytes-wide accumulators (4 or 8); a device can give a CTA at most its
// opt-in limit (cudaDevAttrMaxSharedMemoryPerBlockOptin), so the usable k
// depends on the dtype and the device.
std::int64_t influence_block_shared_bytes(std::int64_t k, std::int64_t acc_bytes);

// Query rows one launch covers: 64 per CTA, at most 65535 CTAs along grid.y.
constexpr std::int64_t kMaxQueryRows = 65535LL * 64;

// Training rows one launch covers: 64 per tile, tile counts kept in int.
constexpr std::int64_t kMaxTrainRows = 2147483647LL * 64;

// Bytes of workspace a launch with `splits` column splits needs.
inline std::int64_t influence_block_workspace_bytes(std::int64_t n_query, std::int64_t k, int splits,
                                                    std::int64_t acc_bytes) {
  return 2 * n_query * splits * k * (acc_bytes + 8);
}

// How many column splits (CTAs along the training rows) a call will use; the
// caller allocates a workspace of 2 * n_query * splits * k * (sizeof(acc) + 8)
// bytes for them.
int influence_block_splits(std::int64_t n_query, std::int64_t b, std::int64_t k, int num_sms);

// Launches on `stream` (a cudaStream_t); returns without synchronising.
void influence_block(const InfluenceBlockArgs& args, std::uintptr_t workspace, int splits, std::uintptr_t stream);

std::string runtime_version();

}  // namespace torchfluence::cuda
