// CPU linear-head HVP. For each vector v (threads split the vectors, so each
// owns its output rows and nothing needs reducing) and each block of samples:
// u = V[v] x~_i (C dots of length d), r = h_i u from the probabilities of the
// logits, then out[v, c, :] += r_c x~_i. The logits' probabilities are computed
// once per sample in a first pass. Memory besides the output: n x C plus a
// block of r per thread.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "linear_head.h"

namespace torchfluence::cpu {
namespace {

constexpr std::int64_t BLOCK = 64;  // samples whose r values are formed before the rank-B update

template <typename T>
T dot(const T* a, const T* x, std::int64_t stride_x, std::int64_t d) {
  T s = 0;
  if (stride_x == 1) {
#pragma omp simd reduction(+ : s)
    for (std::int64_t j = 0; j < d; ++j) s += a[j] * x[j];
  } else {
    for (std::int64_t j = 0; j < d; ++j) s += a[j] * x[j * stride_x];
  }
  return s;
}

template <typename T>
void linear_head_typed(const LinearHeadArgs& a) {
  const std::int64_t n = a.features.rows, d = a.features.cols, C = a.weight.rows, k = a.k;
  if (n == 0 || k == 0) return;
  const bool has_bias = a.bias != 0;
  const std::int64_t d1 = d + (has_bias ? 1 : 0);
  const T* X = reinterpret_cast<const T*>(a.features.data);
  const T* W = reinterpret_cast<const T*>(a.weight.data);
  const T* b = reinterpret_cast<const T*>(a.bias);
  const T* V = reinterpret_cast<const T*>(a.vectors);
  T* out = reinterpret_cast<T*>(a.out);
  const std::int64_t sxr = a.features.stride_row, sxc = a.features.stride_col;
  const T inv_n = T(1) / static_cast<T>(a.n_total);

  // Pass 1: what h_i needs, per sample and class (probabilities, or sigmoid slopes).
  std::vector<T> prob(n * C);
  std::vector<T> w_row(C * d);  // W made contiguous once
  for (std::int64_t c = 0; c < C; ++c)
    for (std::int64_t j = 0; j < d; ++j) w_row[c * d + j] = W[c * a.weight.stride_row + j * a.weight.stride_col];
#pragma omp parallel for schedule(static)
  for (std::int64_t i = 0; i < n; ++i) {
    T* p = &prob[i * C];
    for (std::int64_t c = 0; c < C; ++c) p[c] = dot(&w_row[c * d], X + i * sxr, sxc, d) + (has_bias ? b[c] : T(0));
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

  // Pass 2: one vector per thread at a time.
#pragma omp parallel
  {
    std::vector<T> r(BLOCK * C);
    std::vector<T> x_block(BLOCK * d);
#pragma omp for schedule(dynamic, 1)
    for (std::int64_t v = 0; v < k; ++v) {
      const T* Vv = V + v * C * d1;
      T* Ov = out + v * C * d1;
      for (std::int64_t i0 = 0; i0 < n; i0 += BLOCK) {
        const std::int64_t nb = std::min(BLOCK, n - i0);
        for (std::int64_t ii = 0; ii < nb; ++ii)
          for (std::int64_t j = 0; j < d; ++j) x_block[ii * d + j] = X[(i0 + ii) * sxr + j * sxc];
        for (std::int64_t ii = 0; ii < nb; ++ii) {
          T* ri = &r[ii * C];
          const T* p = &prob[(i0 + ii) * C];
          for (std::int64_t c = 0; c < C; ++c)
            ri[c] = dot(Vv + c * d1, &x_block[ii * d], 1, d) + (has_bias ? Vv[c * d1 + d] : T(0));
          if (a.loss == HeadLoss::CrossEntropy) {  // (diag p - p p^T) u
            T pu = 0;
            for (std::int64_t c = 0; c < C; ++c) pu += p[c] * ri[c];
            for (std::int64_t c = 0; c < C; ++c) ri[c] = p[c] * (ri[c] - pu);
          } else if (a.loss == HeadLoss::MSE) {
            for (std::int64_t c = 0; c < C; ++c) ri[c] *= T(2) / static_cast<T>(C);
          } else {
            for (std::int64_t c = 0; c < C; ++c) ri[c] *= p[c];
          }
        }
        for (std::int64_t c = 0; c < C; ++c) {
          T* row = Ov + c * d1;
          for (std::int64_t ii = 0; ii < nb; ++ii) {
            const T s = r[ii * C + c] * inv_n;
            const T* x = &x_block[ii * d];
#pragma omp simd
            for (std::int64_t j = 0; j < d; ++j) row[j] += s * x[j];
            if (has_bias) row[d] += s;
          }
        }
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
