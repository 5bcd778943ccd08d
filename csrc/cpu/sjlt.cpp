// CPU SJLT: out[r, b] += sum_c P[b, offset + c] G[r, c], OpenMP over row panels.
//
// Each thread owns a contiguous range of panels of R rows (R * sizeof(T) = 64
// bytes, one AVX-512 vector), kept transposed as [k][R] accumulators, so one
// vector add updates a bucket for R rows at once. It walks the columns in
// tiles: hashes every (column, block) pair of the tile into a table of bucket
// codes, then scatters the tile into each of its panels, so a hash serves all
// the thread's rows.
//
// Determinism: every output is owned by one thread and receives its terms in
// ascending column order, starting from its value in `out`, whatever the number
// of threads, the tile size or the panel width; that is also the CUDA kernel's
// order, so both give the same bits.
#include "sjlt.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "../sjlt.h"

namespace torchfluence::cpu {
namespace {

constexpr std::int64_t kTileCodes = 16384;  // bucket codes hashed per step (64 KiB)
constexpr std::int64_t kPackCols = 512;     // columns packed per panel step (stays in L1/L2)
// Below this many scatter updates (about half a millisecond on one core) a call runs on one
// thread: waking the team costs more, and on a loaded machine it can cost a scheduler slice.
constexpr std::int64_t kParallelUpdates = std::int64_t(1) << 20;

// acc[code >> 1][0:R] += sign * xs[cc][0:R] for each column of the packed slice and each block.
// Multiplying by +-1 is exact, so the add is the only rounding (also when the
// compiler contracts it into a fused multiply-add).
template <typename T, int R>
__attribute__((always_inline)) inline void scatter_body(const std::int32_t* __restrict codes, std::int64_t cols,
                                                        std::int64_t s, const T* __restrict xs, T* __restrict acc) {
  typedef T Vec __attribute__((vector_size(R * sizeof(T))));
  for (std::int64_t cc = 0; cc < cols; ++cc) {
    Vec x;
    std::memcpy(&x, xs + cc * R, sizeof(Vec));
    const std::int32_t* code = codes + cc * s;
    for (std::int64_t j = 0; j < s; ++j) {
      T* a = acc + static_cast<std::int64_t>(code[j] >> 1) * R;
      Vec v;
      std::memcpy(&v, a, sizeof(Vec));
      v += static_cast<T>(1 - 2 * (code[j] & 1)) * x;
      std::memcpy(a, &v, sizeof(Vec));
    }
  }
}

// xs[cc][r] = scale * G[r, cc] for the panel's rows (zero beyond `rows`), rounded in T
// like the CUDA kernel's staging tile. Full panels of a row-contiguous G go
// through 16-column blocks transposed in registers: reading each row in
// stretches and writing xs contiguously is several times faster than either
// loop order alone.
template <typename T, int R>
__attribute__((always_inline)) inline void pack_body(const T* __restrict g, std::int64_t stride_row,
                                                     std::int64_t stride_col, std::int64_t rows, std::int64_t cols,
                                                     T scale, T* __restrict xs) {
  constexpr int B = 16;
  std::int64_t c0 = 0;
  if (rows == R && stride_col == 1) {
    for (; c0 + B <= cols; c0 += B) {
      T t[R][B];
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < B; ++c) t[r][c] = scale * g[r * stride_row + c0 + c];
      for (int c = 0; c < B; ++c)
        for (int r = 0; r < R; ++r) xs[(c0 + c) * R + r] = t[r][c];
    }
  }
  for (; c0 < cols; ++c0)
    for (int r = 0; r < R; ++r) xs[c0 * R + r] = r < rows ? scale * g[r * stride_row + c0 * stride_col] : T(0);
}

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define TORCHFLUENCE_SJLT_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TORCHFLUENCE_SJLT_CLONES
#endif

// Wide panels for many rows, narrow ones when a call has only a few (fewer idle lanes).
TORCHFLUENCE_SJLT_CLONES void scatter(const std::int32_t* codes, std::int64_t cols, std::int64_t s, const float* xs,
                                      float* acc, int R) {
  if (R == 16) scatter_body<float, 16>(codes, cols, s, xs, acc);
  else scatter_body<float, 4>(codes, cols, s, xs, acc);
}

TORCHFLUENCE_SJLT_CLONES void scatter(const std::int32_t* codes, std::int64_t cols, std::int64_t s, const double* xs,
                                      double* acc, int R) {
  if (R == 8) scatter_body<double, 8>(codes, cols, s, xs, acc);
  else scatter_body<double, 2>(codes, cols, s, xs, acc);
}

TORCHFLUENCE_SJLT_CLONES void pack(const float* g, std::int64_t stride_row, std::int64_t stride_col,
                                   std::int64_t rows, std::int64_t cols, float scale, float* xs, int R) {
  if (R == 16) pack_body<float, 16>(g, stride_row, stride_col, rows, cols, scale, xs);
  else pack_body<float, 4>(g, stride_row, stride_col, rows, cols, scale, xs);
}

TORCHFLUENCE_SJLT_CLONES void pack(const double* g, std::int64_t stride_row, std::int64_t stride_col,
                                   std::int64_t rows, std::int64_t cols, double scale, double* xs, int R) {
  if (R == 8) pack_body<double, 8>(g, stride_row, stride_col, rows, cols, scale, xs);
  else pack_body<double, 2>(g, stride_row, stride_col, rows, cols, scale, xs);
}

template <typename T>
void sjlt_typed(const SjltArgs& a) {
  const MatrixRef& g = a.input;
  const MatrixRef& o = a.out;
  const std::int64_t n = g.rows, p = g.cols, k = o.cols, s = a.s;
  if (n == 0 || p == 0) return;
  const T* G = reinterpret_cast<const T*>(g.data);
  T* out = reinterpret_cast<T*>(o.data);
  const T scale = static_cast<T>(1.0 / std::sqrt(static_cast<double>(s)));
  const std::uint64_t key = sjlt::key(a.seed);
  std::vector<std::int64_t> lo(s + 1);
  for (std::int64_t j = 0; j <= s; ++j) lo[j] = sjlt::block_begin(j, k, s);

  // The panel width does not change any result (each output's order is fixed).
  constexpr int wide = 64 / sizeof(T), narrow = 16 / sizeof(T);
  const int R = n >= wide ? wide : narrow;
  const std::int64_t panels = (n + R - 1) / R;
  // About 64 KiB of codes per tile.
  const std::int64_t tile_cols =
      std::min(p, std::max<std::int64_t>(kPackCols, (kTileCodes / s) / kPackCols * kPackCols));
  const bool parallel = panels > 1 && static_cast<double>(n) * static_cast<double>(p) * static_cast<double>(s) >=
                                          static_cast<double>(kParallelUpdates);

#pragma omp parallel if (parallel)
  {
    // A contiguous range of panels per thread, and no barrier: under load a
    // thread that waits for a descheduled one loses a whole time slice.
    const std::int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
    const std::int64_t p0 = panels * t / threads, p1 = panels * (t + 1) / threads;
    if (p0 < p1) {
      std::vector<T> acc(static_cast<std::size_t>((p1 - p0) * k * R));  // [panel][k][R]
      std::vector<T> xs(static_cast<std::size_t>(kPackCols * R));
      std::vector<std::int32_t> codes(static_cast<std::size_t>(tile_cols * s));
      for (std::int64_t pn = p0; pn < p1; ++pn) {
        T* pa = acc.data() + (pn - p0) * k * R;
        for (int r = 0; r < R; ++r) {
          const std::int64_t row = pn * R + r;
          if (row < n) {
            const T* src = out + row * o.stride_row;
            for (std::int64_t b = 0; b < k; ++b) pa[b * R + r] = src[b * o.stride_col];
          } else {
            for (std::int64_t b = 0; b < k; ++b) pa[b * R + r] = T(0);
          }
        }
      }
      for (std::int64_t c0 = 0; c0 < p; c0 += tile_cols) {
        const std::int64_t tc = std::min(tile_cols, p - c0);
        // Each thread hashes the tile itself: s hashes per column against s * R * (p1 - p0)
        // additions, and no thread ever waits for another.
        for (std::int64_t cc = 0; cc < tc; ++cc)
          for (std::int64_t j = 0; j < s; ++j)
            codes[cc * s + j] =
                static_cast<std::int32_t>(sjlt::code(key, a.offset + c0 + cc, j, s, lo[j], lo[j + 1] - lo[j]));
        for (std::int64_t pn = p0; pn < p1; ++pn) {
          const std::int64_t rows = std::min<std::int64_t>(R, n - pn * R);
          for (std::int64_t q0 = 0; q0 < tc; q0 += kPackCols) {
            const std::int64_t qc = std::min(kPackCols, tc - q0);
            pack(G + pn * R * g.stride_row + (c0 + q0) * g.stride_col, g.stride_row, g.stride_col, rows, qc, scale,
                 xs.data(), R);
            scatter(codes.data() + q0 * s, qc, s, xs.data(), acc.data() + (pn - p0) * k * R, R);
          }
        }
      }
      for (std::int64_t pn = p0; pn < p1; ++pn) {
        const T* pa = acc.data() + (pn - p0) * k * R;
        const std::int64_t rows = std::min<std::int64_t>(R, n - pn * R);
        for (std::int64_t r = 0; r < rows; ++r) {
          T* dst = out + (pn * R + r) * o.stride_row;
          for (std::int64_t b = 0; b < k; ++b) dst[b * o.stride_col] = pa[b * R + r];
        }
      }
    }
  }
}

}  // namespace

void sjlt(const SjltArgs& args) {
  switch (args.dtype) {
    case DType::Float32: sjlt_typed<float>(args); break;
    case DType::Float64: sjlt_typed<double>(args); break;
    default: check(false, "sjlt (CPU): dtype must be float32 or float64");
  }
}

}  // namespace torchfluence::cpu
