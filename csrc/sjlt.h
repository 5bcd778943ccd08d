// The sparse Johnson-Lindenstrauss transform (SJLT) shared by the CPU and CUDA kernels.
//
// P is a (k, p) matrix with exactly s non-zeros per column, each +-1/sqrt(s)
// (Kane & Nelson's block construction: the k rows are cut into s contiguous
// blocks and column c has one non-zero in each block, so its non-zeros never
// collide and every column has norm exactly 1). P is never stored: the bucket
// and sign of (column c, block j) are a pure function of (seed, c, j, k, s),
// evaluated identically on the host and on the device, so the CPU and CUDA
// kernels apply the same matrix. python/torchfluence/reference.py implements
// the same function with NumPy integers (the tests' oracle).
//
// The hash is SplitMix64: the (c * s + j + 1)-th output of the generator whose
// state starts at mix64(seed + golden). It needs only 64-bit integer
// arithmetic, wraps modulo 2^64 the same everywhere, and holds for any column
// index up to 2^63 - 1 (a column offset of a block of a huge parameter vector).
#pragma once

#include <cstdint>

#include "common.h"
#include "sjlt_args.h"

namespace torchfluence {

namespace sjlt {

constexpr std::uint64_t kGolden = 0x9E3779B97F4A7C15ULL;

TORCHFLUENCE_HOST_DEVICE inline std::uint64_t mix64(std::uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Generator state for a seed (computed once per call).
TORCHFLUENCE_HOST_DEVICE inline std::uint64_t key(std::uint64_t seed) { return mix64(seed + kGolden); }

// First row of block j; block j holds rows [block_begin(j), block_begin(j + 1)).
// j <= s <= 64 and k <= 2^30, so j * k cannot overflow.
TORCHFLUENCE_HOST_DEVICE inline std::int64_t block_begin(std::int64_t j, std::int64_t k, std::int64_t s) {
  return j * k / s;
}

// The block that row b belongs to: the largest j with block_begin(j) <= b.
TORCHFLUENCE_HOST_DEVICE inline std::int64_t block_of(std::int64_t b, std::int64_t k, std::int64_t s) {
  return ((b + 1) * s - 1) / k;
}

// 2 * bucket + (1 if the sign is negative) for global column `column` in block j,
// whose rows are [lo, lo + size). The bucket is lo plus Lemire's multiply-shift
// reduction of the hash's high 32 bits to the block size (< 2^32); the sign is
// the hash's low bit. The kernels pass lo and size from a per-call table: the
// 64-bit divisions of block_begin would otherwise dominate the hash.
TORCHFLUENCE_HOST_DEVICE inline std::int64_t code(std::uint64_t key, std::int64_t column, std::int64_t j,
                                                  std::int64_t s, std::int64_t lo, std::int64_t size) {
  const std::uint64_t counter = static_cast<std::uint64_t>(column) * static_cast<std::uint64_t>(s) +
                                static_cast<std::uint64_t>(j) + 1;
  const std::uint64_t h = mix64(key + counter * kGolden);
  const std::int64_t bucket = lo + static_cast<std::int64_t>(((h >> 32) * static_cast<std::uint64_t>(size)) >> 32);
  return 2 * bucket + static_cast<std::int64_t>(h & 1);
}

TORCHFLUENCE_HOST_DEVICE inline std::int64_t code(std::uint64_t key, std::int64_t column, std::int64_t j,
                                                  std::int64_t k, std::int64_t s) {
  const std::int64_t lo = block_begin(j, k, s);
  return code(key, column, j, s, lo, block_begin(j + 1, k, s) - lo);
}

}  // namespace sjlt
}  // namespace torchfluence
