// CPU influence-block kernel: scores = S @ G^T, blocked like a GEMM, with a
// top-k epilogue that runs while each column block of scores is still in cache.
//
// Loop nest (Goto/BLIS style, `gemm_team` in gemm_tile.h): for each block of NC
// training rows, for each KC-slice of the parameter dimension, pack G's slice
// into NR-wide panels and S's slice into MR-tall panels, then run an MR x NR
// register micro-kernel over every (query panel, train panel) pair. When the last slice is done, every
// query row of the NC-wide score block is optionally copied to `scores` and
// merged into that row's running top-k (merge_row: non-finite scores are
// counted, never ranked).
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "gemm_tile.h"
#include "influence_block.h"
#include "topk_merge.h"

namespace torchfluence::cpu {
namespace {

constexpr std::int64_t KC = 256;  // parameter slice: a packed G panel is KC x NR (16 KiB float)
constexpr std::int64_t NC = 512;  // training rows per score block (the top-k epilogue works on these)

template <typename T>
void influence_block_typed(const InfluenceBlockArgs& a) {
  constexpr int MR = Tile<T>::MR, NR = Tile<T>::NR;
  const std::int64_t n_query = a.queries.rows, p = a.queries.cols, b = a.train.rows;
  if (n_query == 0 || b == 0) return;
  const T* S = reinterpret_cast<const T*>(a.queries.data);
  const T* G = reinterpret_cast<const T*>(a.train.data);
  T* out = reinterpret_cast<T*>(a.scores.data);
  const std::int64_t k = a.topk.k();
  T* lv = reinterpret_cast<T*>(a.topk.largest_values.data);
  T* sv = reinterpret_cast<T*>(a.topk.smallest_values.data);
  auto* li = reinterpret_cast<std::int64_t*>(a.topk.largest_indices.data);
  auto* si = reinterpret_cast<std::int64_t*>(a.topk.smallest_indices.data);

  const std::int64_t query_panels = (n_query + MR - 1) / MR;
  const std::int64_t max_train_panels = (std::min(NC, b) + NR - 1) / NR;
  std::vector<T> s_packed(query_panels * MR * std::min(KC, std::max<std::int64_t>(p, 1)));
  std::vector<T> g_packed(max_train_panels * NR * std::min(KC, std::max<std::int64_t>(p, 1)));
  std::vector<T> block(n_query * NC);  // the current score block [n_query, NC]

  std::int64_t nonfinite = 0, bad_query = -1, bad_train = -1;

#pragma omp parallel
  {
    RowScratch<T> scratch;
    std::int64_t count = 0, row = -1, col = -1;  // this thread's non-finite scores, row-major first
    for (std::int64_t j0 = 0; j0 < b; j0 += NC) {
      const std::int64_t nc = std::min(NC, b - j0);
#pragma omp for
      for (std::int64_t i = 0; i < n_query; ++i) std::memset(&block[i * NC], 0, sizeof(T) * nc);

      gemm_team<T>(S, a.queries, nc,
                   [&](std::int64_t jp, std::int64_t k0, std::int64_t kc, T* panel) {
                     pack_panel<T, NR>(G, a.train, j0 + jp * NR, std::min<std::int64_t>(NR, nc - jp * NR), k0, kc,
                                       panel);
                   },
                   block.data(), NC, s_packed.data(), g_packed.data(), KC);

      // Epilogue: the block is complete; rows are independent from here on.
#pragma omp for schedule(dynamic, 4)
      for (std::int64_t i = 0; i < n_query; ++i) {
        const T* scores_row = &block[i * NC];
        if (out) {
          T* dst = out + i * a.scores.stride_row + j0 * a.scores.stride_col;
          for (std::int64_t j = 0; j < nc; ++j) dst[j * a.scores.stride_col] = scores_row[j];
        }
        if (k == 0) continue;
        const NonFiniteCount bad = merge_row<T>(scores_row, 1, nc, a.offset + j0, lv + i * k, li + i * k,
                                                sv + i * k, si + i * k, k, scratch);
        if (bad.count > 0) {
          if (comes_first(i, j0 + bad.first, row, col)) row = i, col = j0 + bad.first;
          count += bad.count;
        }
      }
    }
    if (count > 0) {
#pragma omp critical(torchfluence_nonfinite)
      {
        nonfinite += count;
        if (comes_first(row, col, bad_query, bad_train)) bad_query = row, bad_train = col;
      }
    }
  }
  if (nonfinite > 0) {
    auto* status = reinterpret_cast<std::int64_t*>(a.status.data);
    if (status[0] == 0) status[1] = bad_query, status[2] = a.offset + bad_train;
    status[0] += nonfinite;
  }
}

}  // namespace

void influence_block(const InfluenceBlockArgs& args) {
  switch (args.dtype) {
    case DType::Float32: influence_block_typed<float>(args); break;
    case DType::Float64: influence_block_typed<double>(args); break;
    default: check(false, "influence_block (CPU): dtype must be float32 or float64");
  }
}

int max_threads() { return omp_get_max_threads(); }

}  // namespace torchfluence::cpu
