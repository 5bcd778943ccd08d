// CPU linear-head HVP, as two register-tiled GEMMs per block of samples with
// the loss's Hessian applied in between:
//   U = X V^T            (b x kC: every vector times every sample's features)
//   R = h(U)             (per sample: (diag p - p p^T) u for CE, scalings otherwise)
//   out += R^T X / n     (kC x d; the bias column gets the column sums of R)
// The logits' probabilities come from a first pass. Memory besides the output:
// n x C plus two b x kC blocks.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "gemm_tile.h"
#include "linear_head.h"

namespace torchfluence::cpu {
namespace {

constexpr std::int64_t BLOCK = 256;  // samples per block
constexpr std::int64_t KC = 256;     // depth slice of the GEMMs

// C[m x n] (row stride ldc) += S[m x K] G[n x K]^T for strided S and G, on the calling OpenMP team.
template <typename T>
void gemm_nt(const T* S, const MatrixRef& s, const T* G, const MatrixRef& g, T* C, std::int64_t ldc,
             std::vector<T>& s_packed, std::vector<T>& g_packed) {
  constexpr int MR = Tile<T>::MR, NR = Tile<T>::NR;
  const std::int64_t n = g.rows, depth = std::min(KC, s.cols);
#pragma omp single
  {
    s_packed.resize(((s.rows + MR - 1) / MR) * MR * depth);
    g_packed.resize(((n + NR - 1) / NR) * NR * depth);
  }
  gemm_team<T>(S, s, n,
               [&](std::int64_t jp, std::int64_t k0, std::int64_t kc, T* panel) {
                 pack_panel<T, NR>(G, g, jp * NR, std::min<std::int64_t>(NR, n - jp * NR), k0, kc, panel);
               },
               C, ldc, s_packed.data(), g_packed.data(), KC);
}

template <typename T>
T dot(const T* a, std::int64_t stride_a, const T* x, std::int64_t stride_x, std::int64_t d) {
  T s = 0;
  for (std::int64_t j = 0; j < d; ++j) s += a[j * stride_a] * x[j * stride_x];
  return s;
}

template <typename T>
void linear_head_typed(const LinearHeadArgs& a) {
  const std::int64_t n = a.features.rows, d = a.features.cols, C = a.weight.rows, k = a.k(), kC = k * C;
  if (n == 0 || k == 0 || C == 0) return;
  const bool has_bias = a.has_bias();
  const std::int64_t d1 = d + (has_bias ? 1 : 0);
  const T* X = reinterpret_cast<const T*>(a.features.data);
  const T* W = reinterpret_cast<const T*>(a.weight.data);
  const T* b = reinterpret_cast<const T*>(a.bias.data);
  const T* V = reinterpret_cast<const T*>(a.vectors.data);
  T* out = reinterpret_cast<T*>(a.out.data);
  const T inv_n = T(1) / static_cast<T>(a.n_total);

  // Pass 1: what h_i needs per sample and class (probabilities, or sigmoid slopes).
  std::vector<T> prob(n * C);
#pragma omp parallel for schedule(static)
  for (std::int64_t i = 0; i < n; ++i) {
    T* p = &prob[i * C];
    for (std::int64_t c = 0; c < C; ++c)
      p[c] = dot(W + c * a.weight.stride_row, a.weight.stride_col, X + i * a.features.stride_row,
                 a.features.stride_col, d) + (has_bias ? b[c] : T(0));
    if (a.loss == HeadLoss::CrossEntropy) {
      const T top = *std::max_element(p, p + C);
      T total = 0;
      for (std::int64_t c = 0; c < C; ++c) total += (p[c] = std::exp(p[c] - top));
      for (std::int64_t c = 0; c < C; ++c) p[c] /= total;
    } else if (a.loss == HeadLoss::BCEWithLogits) {
      for (std::int64_t c = 0; c < C; ++c) {
        const T s = T(1) / (T(1) + std::exp(-p[c]));
        p[c] = s * (T(1) - s) / static_cast<T>(C);
      }
    }
  }

  // V as a (kC x d) matrix with row stride d1 (the bias column is left out of the GEMM).
  const MatrixRef v_ref{a.vectors.data, kC, d, d1, 1, a.vectors.dtype};
  std::vector<T> r(BLOCK * kC);
  std::vector<T> s_packed, g_packed;
  std::vector<T> bias_sums(has_bias ? kC : 0, T(0));
#pragma omp parallel
  for (std::int64_t i0 = 0; i0 < n; i0 += BLOCK) {
    const std::int64_t nb = std::min(BLOCK, n - i0);
    // U = X_block V^T, started from the bias part of V x~.
#pragma omp for
    for (std::int64_t ii = 0; ii < nb; ++ii)
      for (std::int64_t q = 0; q < kC; ++q) r[ii * kC + q] = has_bias ? V[q * d1 + d] : T(0);
    const MatrixRef x_block{a.features.data + static_cast<std::uintptr_t>(i0 * a.features.stride_row * sizeof(T)),
                            nb, d, a.features.stride_row, a.features.stride_col, a.features.dtype};
    gemm_nt<T>(reinterpret_cast<const T*>(x_block.data), x_block, V, v_ref, r.data(), kC, s_packed, g_packed);
    // R = h(U), per (sample, vector): C values at a time.
#pragma omp for
    for (std::int64_t t = 0; t < nb * k; ++t) {
      const std::int64_t ii = t / k;
      T* u = &r[ii * kC + (t % k) * C];
      const T* p = &prob[(i0 + ii) * C];
      if (a.loss == HeadLoss::CrossEntropy) {
        T pu = 0;
        for (std::int64_t c = 0; c < C; ++c) pu += p[c] * u[c];
        for (std::int64_t c = 0; c < C; ++c) u[c] = p[c] * (u[c] - pu) * inv_n;
      } else if (a.loss == HeadLoss::MSE) {
        for (std::int64_t c = 0; c < C; ++c) u[c] *= T(2) / static_cast<T>(C) * inv_n;
      } else {
        for (std::int64_t c = 0; c < C; ++c) u[c] *= p[c] * inv_n;
      }
    }
    // out[:, :d] += R^T X_block: S = R^T (kC x nb), G = X_block^T (d x nb).
    const MatrixRef rt{reinterpret_cast<std::uintptr_t>(r.data()), kC, nb, 1, kC, a.features.dtype};
    const MatrixRef xt{x_block.data, d, nb, a.features.stride_col, a.features.stride_row, a.features.dtype};
    gemm_nt<T>(r.data(), rt, reinterpret_cast<const T*>(xt.data), xt, out, d1, s_packed, g_packed);
    if (has_bias) {
#pragma omp for
      for (std::int64_t q = 0; q < kC; ++q) {
        T sum = 0;
        for (std::int64_t ii = 0; ii < nb; ++ii) sum += r[ii * kC + q];
        out[q * d1 + d] += sum;
      }
    }
  }
}

}  // namespace

void linear_head_hvp(const LinearHeadArgs& args) {
  switch (args.dtype) {
    case DType::Float32: linear_head_typed<float>(args); break;
    case DType::Float64: linear_head_typed<double>(args); break;
    default: check(false, "linear_head_hvp (CPU): dtype must be float32 or float64");
  }
}

}  // namespace torchfluence::cpu
