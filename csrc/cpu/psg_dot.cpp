// CPU psg_dot: scores[q, j] += <Q_q, G_j> with G_j = sum_t D[j,t] A[j,t]^T.
//
// The same loop nest as influence_block (a GEMM of queries against per-sample
// gradients), except that the training panel is never read from memory: while
// packing the KC-slice of G's rows for NR samples, each element G_j[o, i] is
// formed from the captured activations and output gradients. A slice is packed
// once per block of NC samples and reused by every query panel, so forming the
// gradients costs n * p * T multiply-adds in total and never n * p memory.
#include <omp.h>

#include <algorithm>
#include <vector>

#include "gemm_tile.h"
#include "psg_dot.h"

namespace torchfluence::cpu {
namespace {

constexpr std::int64_t KC = 256;  // slice of the flattened (d_out, d_in) gradient
constexpr std::int64_t NC = 256;  // samples per score block

// Packs columns [k0, k0 + kc) of the per-sample gradients of samples
// [j0, j0 + nr) into a k-major panel of width W (missing samples are zero).
template <typename T, int W>
void pack_gradient_panel(const PsgDotArgs& a, std::int64_t j0, std::int64_t nr, std::int64_t k0, std::int64_t kc,
                         T* panel, std::vector<T>& row) {
  const T* A = reinterpret_cast<const T*>(a.activations.data);
  const T* D = reinterpret_cast<const T*>(a.output_grads.data);
  const auto& as = a.activations;
  const auto& ds = a.output_grads;
  const std::int64_t d_in = as.d, T_len = as.t;
  row.resize(kc);
  for (int r = 0; r < W; ++r) {
    if (r >= nr) {
      for (std::int64_t kk = 0; kk < kc; ++kk) panel[kk * W + r] = T(0);
      continue;
    }
    const std::int64_t j = j0 + r;
    std::fill(row.begin(), row.end(), T(0));
    // Walk the slice one gradient row (fixed o) segment at a time, so the inner
    // loop runs over contiguous i and vectorises.
    std::int64_t kk = 0;
    while (kk < kc) {
      const std::int64_t k = k0 + kk, o = k / d_in, i0 = k % d_in;
      const std::int64_t len = std::min(d_in - i0, kc - kk);
      for (std::int64_t t = 0; t < T_len; ++t) {
        const T d = D[j * ds.stride_n + t * ds.stride_t + o * ds.stride_d];
        if (d == T(0)) continue;
        const T* a_row = A + j * as.stride_n + t * as.stride_t + i0 * as.stride_d;
        T* out = row.data() + kk;
        if (as.stride_d == 1) {
          for (std::int64_t i = 0; i < len; ++i) out[i] += d * a_row[i];
        } else {
          for (std::int64_t i = 0; i < len; ++i) out[i] += d * a_row[i * as.stride_d];
        }
      }
      kk += len;
    }
    for (std::int64_t kk2 = 0; kk2 < kc; ++kk2) panel[kk2 * W + r] = row[kk2];
  }
}

template <typename T>
void psg_dot_typed(const PsgDotArgs& a) {
  constexpr int MR = Tile<T>::MR, NR = Tile<T>::NR;
  const std::int64_t n_query = a.queries.rows, p = a.queries.cols, b = a.activations.n;
  if (n_query == 0 || b == 0 || p == 0) return;
  const T* Q = reinterpret_cast<const T*>(a.queries.data);
  T* out = reinterpret_cast<T*>(a.scores.data);

  const std::int64_t query_panels = (n_query + MR - 1) / MR;
  const std::int64_t max_train_panels = (std::min(NC, b) + NR - 1) / NR;
  const std::int64_t kc_max = std::min(KC, p);
  std::vector<T> q_packed(query_panels * MR * kc_max);
  std::vector<T> g_packed(max_train_panels * NR * kc_max);
  std::vector<T> block(n_query * NC);

#pragma omp parallel
  {
    std::vector<T> row;
    for (std::int64_t j0 = 0; j0 < b; j0 += NC) {
      const std::int64_t nc = std::min(NC, b - j0);
#pragma omp for
      for (std::int64_t i = 0; i < n_query; ++i) std::fill(&block[i * NC], &block[i * NC] + nc, T(0));

      gemm_team<T>(Q, a.queries, nc,
                   [&](std::int64_t jp, std::int64_t k0, std::int64_t kc, T* panel) {
                     pack_gradient_panel<T, NR>(a, j0 + jp * NR, std::min<std::int64_t>(NR, nc - jp * NR), k0, kc,
                                                panel, row);
                   },
                   block.data(), NC, q_packed.data(), g_packed.data(), KC);
#pragma omp for
      for (std::int64_t i = 0; i < n_query; ++i) {
        T* dst = out + i * a.scores.stride_row + j0 * a.scores.stride_col;
        for (std::int64_t j = 0; j < nc; ++j) dst[j * a.scores.stride_col] += block[i * NC + j];
      }
    }
  }
}

}  // namespace

void psg_dot(const PsgDotArgs& args) {
  switch (args.dtype) {
    case DType::Float32: psg_dot_typed<float>(args); break;
    case DType::Float64: psg_dot_typed<double>(args); break;
    default: check(false, "psg_dot (CPU): dtype must be float32 or float64");
  }
}

}  // namespace torchfluence::cpu
