// CPU topk_merge: one block of precomputed scores merged into running
// per-query top-k lists, one query row per OpenMP iteration.
//
// Rows are independent, so threads never share a list. Each row is screened
// against its current k-th entries (merge_row in topk_merge.h): after the
// first blocks of a stream almost every score is rejected by that compare.
#include <omp.h>

#include "topk_merge.h"

namespace torchfluence::cpu {
namespace {

// Below this many scores a call runs on one thread (waking the team costs more).
constexpr std::int64_t kParallelScores = 1 << 15;

template <typename T>
void topk_merge_typed(const TopKMergeArgs& a) {
  const std::int64_t n_query = a.scores.rows, b = a.scores.cols, k = a.topk.k();
  if (n_query == 0 || b == 0) return;
  const T* scores = reinterpret_cast<const T*>(a.scores.data);
  T* lv = reinterpret_cast<T*>(a.topk.largest_values.data);
  T* sv = reinterpret_cast<T*>(a.topk.smallest_values.data);
  auto* li = reinterpret_cast<std::int64_t*>(a.topk.largest_indices.data);
  auto* si = reinterpret_cast<std::int64_t*>(a.topk.smallest_indices.data);

  std::int64_t nonfinite = 0, bad_row = -1, bad_col = -1;
#pragma omp parallel if (n_query > 1 && n_query * b >= kParallelScores)
  {
    RowScratch<T> scratch;
    std::int64_t count = 0, row = -1, col = -1;
    // Dynamic chunks are handed out in increasing order, so a thread's first
    // non-finite score is also its row-major first.
#pragma omp for schedule(dynamic, 4) nowait
    for (std::int64_t i = 0; i < n_query; ++i) {
      const NonFiniteCount bad = merge_row<T>(scores + i * a.scores.stride_row, a.scores.stride_col, b, a.offset,
                                              lv + i * k, li + i * k, sv + i * k, si + i * k, k, scratch);
      if (bad.count > 0) {
        if (count == 0) row = i, col = bad.first;
        count += bad.count;
      }
    }
    if (count > 0) {
#pragma omp critical(torchfluence_topk_merge_nonfinite)
      {
        nonfinite += count;
        if (comes_first(row, col, bad_row, bad_col)) bad_row = row, bad_col = col;
      }
    }
  }
  if (nonfinite > 0) {
    auto* status = reinterpret_cast<std::int64_t*>(a.status.data);
    if (status[0] == 0) status[1] = bad_row, status[2] = a.offset + bad_col;
    status[0] += nonfinite;
  }
}

}  // namespace

void topk_merge(const TopKMergeArgs& args) {
  switch (static_cast<DType>(args.scores.dtype)) {
    case DType::Float32: topk_merge_typed<float>(args); break;
    case DType::Float64: topk_merge_typed<double>(args); break;
    default: check(false, "topk_merge (CPU): scores must be float32 or float64");
  }
}

}  // namespace torchfluence::cpu
