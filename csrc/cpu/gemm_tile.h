// The register-tiled GEMM pieces shared by the CPU kernels: panel packing and
// an MR x NR micro-kernel (Goto/BLIS style), compiled per ISA.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "../common.h"

namespace torchfluence::cpu {
namespace {  // each kernel file gets its own copies (and its own ISA clones)

// Panel widths: MR x NR accumulators stay in vector registers (6 x 16 floats
// is twelve AVX2 registers, like the classic BLIS Haswell kernel).
template <typename T> struct Tile;
template <> struct Tile<float> { static constexpr int MR = 6, NR = 16; };
template <> struct Tile<double> { static constexpr int MR = 6, NR = 8; };

// Packs rows [r0, r0+nr) and columns [k0, k0+kc) of a strided matrix into a
// k-major panel of width W, zero-padding missing rows.
template <typename T, int W>
void pack_panel(const T* base, const MatrixRef& m, std::int64_t r0, std::int64_t nr,
                std::int64_t k0, std::int64_t kc, T* panel) {
  for (std::int64_t kk = 0; kk < kc; ++kk) {
    const T* col = base + (k0 + kk) * m.stride_col;
    T* out = panel + kk * W;
    for (int r = 0; r < W; ++r) out[r] = r < nr ? col[(r0 + r) * m.stride_row] : T(0);
  }
}

// c[rows x cols] += S_panel^T G_panel over kc. Written with GCC/Clang vector
// extensions (two 32-byte vectors per row of the tile) so the accumulators
// stay in registers; the per-ISA clones below let one wheel use AVX2+FMA
// (x86-64-v3) or AVX-512 (v4) where the CPU has them and SSE2 elsewhere.
template <typename T>
__attribute__((always_inline)) inline void micro_kernel_body(std::int64_t kc, const T* __restrict s_panel,
                                                             const T* __restrict g_panel, T* __restrict c,
                                                             std::int64_t ldc, int rows, int cols) {
  typedef T Vec __attribute__((vector_size(32)));
  constexpr int MR = Tile<T>::MR, NR = Tile<T>::NR, VL = 32 / sizeof(T);
  static_assert(NR == 2 * VL, "a tile row is two vectors");
  Vec acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = Vec{};
  for (std::int64_t kk = 0; kk < kc; ++kk) {
    Vec g0, g1;
    std::memcpy(&g0, g_panel + kk * NR, sizeof(Vec));
    std::memcpy(&g1, g_panel + kk * NR + VL, sizeof(Vec));
    const T* s = s_panel + kk * MR;
    for (int i = 0; i < MR; ++i) {
      acc[i][0] += s[i] * g0;  // scalar * vector broadcasts
      acc[i][1] += s[i] * g1;
    }
  }
  for (int i = 0; i < rows; ++i) {
    T lanes[NR];
    std::memcpy(lanes, acc[i], sizeof(lanes));
    for (int j = 0; j < cols; ++j) c[i * ldc + j] += lanes[j];
  }
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define TORCHFLUENCE_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TORCHFLUENCE_ISA_CLONES
#endif

TORCHFLUENCE_ISA_CLONES void micro_kernel(std::int64_t kc, const float* s_panel, const float* g_panel, float* c,
                                          std::int64_t ldc, int rows, int cols) {
  micro_kernel_body<float>(kc, s_panel, g_panel, c, ldc, rows, cols);
}

TORCHFLUENCE_ISA_CLONES void micro_kernel(std::int64_t kc, const double* s_panel, const double* g_panel, double* c,
                                          std::int64_t ldc, int rows, int cols) {
  micro_kernel_body<double>(kc, s_panel, g_panel, c, ldc, rows, cols);
}

// The GEMM driver shared by the kernels: c[m x n] (row stride ldc) += S[m x K] G[n x K]^T
// for one depth slice after another. `pack_g(jp, k0, kc, panel)` fills the NR-wide panel jp
// of G's rows for depth [k0, k0 + kc), so G may be a strided matrix or computed on the fly.
// Runs its loops as worksharing constructs of the calling OpenMP team: call it from inside
// a parallel region, with shared buffers of (m rounded up to MR) * min(kc_max, K) and
// (n rounded up to NR) * min(kc_max, K) elements.
template <typename T, typename PackG>
void gemm_team(const T* S, const MatrixRef& s, std::int64_t n, const PackG& pack_g, T* c, std::int64_t ldc,
               T* s_packed, T* g_packed, std::int64_t kc_max) {
  constexpr int MR = Tile<T>::MR, NR = Tile<T>::NR;
  const std::int64_t m = s.rows, K = s.cols;
  const std::int64_t s_panels = (m + MR - 1) / MR, g_panels = (n + NR - 1) / NR;
  for (std::int64_t k0 = 0; k0 < K; k0 += kc_max) {
    const std::int64_t kc = std::min(kc_max, K - k0);
#pragma omp for nowait
    for (std::int64_t jp = 0; jp < g_panels; ++jp) pack_g(jp, k0, kc, g_packed + jp * NR * kc);
#pragma omp for
    for (std::int64_t ip = 0; ip < s_panels; ++ip)
      pack_panel<T, MR>(S, s, ip * MR, std::min<std::int64_t>(MR, m - ip * MR), k0, kc, s_packed + ip * MR * kc);
#pragma omp for collapse(2) schedule(static)
    for (std::int64_t ip = 0; ip < s_panels; ++ip)
      for (std::int64_t jp = 0; jp < g_panels; ++jp)
        micro_kernel(kc, s_packed + ip * MR * kc, g_packed + jp * NR * kc, c + ip * MR * ldc + jp * NR, ldc,
                     static_cast<int>(std::min<std::int64_t>(MR, m - ip * MR)),
                     static_cast<int>(std::min<std::int64_t>(NR, n - jp * NR)));
  }
}

}  // namespace
}  // namespace torchfluence::cpu
