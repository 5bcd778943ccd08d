// CUDA SJLT: out[r, b] += sum_c P[b, offset + c] G[r, c], deterministic.
//
// A CTA owns 32 rows of G (one per lane) and a range of `range` consecutive
// buckets, whose accumulators sit in shared memory as [bucket][row]. It walks
// all columns in tiles of 128: it stages scale * G for the tile transposed in
// shared memory, hashes each (column, block) pair whose block meets its bucket
// range into a code (-1 when the bucket is outside it), and then each of the 8
// warps applies the codes that land in its own eighth of the range: a ballot
// over 32 codes finds them, and the warp adds one column's term to one bucket
// for all 32 rows at a time. No bucket is shared between warps and no atomics
// are used: every output receives its terms in ascending column order,
// starting from its value in `out`, exactly as in the CPU kernel, so both give
// the same bits. Accumulation is in float for float/half/bfloat16 inputs and in
// double for double.
//
// The bucket range does not change any result, so it is picked from the shape
// and the number of SMs: the largest range (fewest re-reads of G, which the
// CTAs over the same rows share through L2) that still gives two CTAs per SM.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "../sjlt.h"
#include "sjlt_cuda.h"

namespace torchfluence::cuda {
namespace {

constexpr int kThreads = 256, kWarps = kThreads / 32;
constexpr int kRows = 32;       // rows of G per CTA: one per lane
constexpr int kTileCols = 128;  // columns staged per step
constexpr int kLd = kRows + 1;  // padded row of the [bucket][row] and [column][row] tiles: no bank conflicts
constexpr int kMinRange = 64;   // >= 8 buckets per warp
constexpr long long kMaxRowTiles = 65535;  // grid.y

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("sjlt (CUDA): ") + what + ": " + cudaGetErrorString(err));
}

template <typename T> __device__ __forceinline__ float load(const T* p) { return static_cast<float>(*p); }
template <> __device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
template <> __device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ double load(const double* p) { return *p; }

// Products rounded on their own (never fused with a later add), as on the CPU.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads) sjlt_kernel(SjltArgs a, long long row_begin, std::uint64_t key, Acc scale,
                                                        int range) {
  extern __shared__ __align__(16) unsigned char smem[];
  Acc* acc = reinterpret_cast<Acc*>(smem);                       // [range][kLd]
  Acc* xs = acc + static_cast<long long>(range) * kLd;           // [kTileCols][kLd]
  int* codes = reinterpret_cast<int*>(xs + kTileCols * kLd);    // [blocks met][kTileCols]

  const T* G = reinterpret_cast<const T*>(a.input.data);
  Acc* out = reinterpret_cast<Acc*>(a.out.data);
  const long long n = a.input.rows, p = a.input.cols, k = a.out.cols, s = a.s;
  const long long gsr = a.input.stride_row, gsc = a.input.stride_col;
  const long long osr = a.out.stride_row, osc = a.out.stride_col;
  const long long b0 = static_cast<long long>(blockIdx.x) * range, b1 = min(b0 + range, k);
  const long long r0 = row_begin + static_cast<long long>(blockIdx.y) * kRows;
  const long long j_first = sjlt::block_of(b0, k, s);
  const int blocks_met = static_cast<int>(sjlt::block_of(b1 - 1, k, s) - j_first + 1);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, per_warp = range / kWarps;
  // First rows of the blocks met (and of the next one): no 64-bit division per hash.
  __shared__ long long block_lo[kSjltMaxS + 1];
  if (threadIdx.x <= blocks_met) block_lo[threadIdx.x] = sjlt::block_begin(j_first + threadIdx.x, k, s);

  for (int e = threadIdx.x; e < range * kRows; e += kThreads) {
    const int bb = e % range, rr = e / range;
    const long long r = r0 + rr, b = b0 + bb;
    acc[bb * kLd + rr] = (r < n && b < b1) ? out[r * osr + b * osc] : Acc(0);
  }
  for (long long c0 = 0; c0 < p; c0 += kTileCols) {
    __syncthreads();  // the previous tile is consumed (and the accumulators and block_lo written)
    for (int e = threadIdx.x; e < kRows * kTileCols; e += kThreads) {
      const int cc = e % kTileCols, rr = e / kTileCols;
      const long long r = r0 + rr, c = c0 + cc;
      xs[cc * kLd + rr] = (r < n && c < p) ? mul_rn(scale, static_cast<Acc>(load(G + r * gsr + c * gsc))) : Acc(0);
    }
    for (int e = threadIdx.x; e < blocks_met * kTileCols; e += kThreads) {
      const long long c = c0 + e % kTileCols;
      const int jj = e / kTileCols;
      int v = -1;
      if (c < p) {
        const long long lo = block_lo[jj];
        const long long code = sjlt::code(key, a.offset + c, j_first + jj, s, lo, block_lo[jj + 1] - lo);
        const long long b = code >> 1;
        if (b >= b0 && b < b1) v = static_cast<int>(2 * (b - b0) + (code & 1));
      }
      codes[e] = v;
    }
    __syncthreads();
    // A bucket lies in one block, so its terms come from one row of `codes`, in
    // column order: ascending cb, then ascending lane within the ballot.
    for (int jj = 0; jj < blocks_met; ++jj) {
      for (int cb = 0; cb < kTileCols; cb += 32) {
        const int v = codes[jj * kTileCols + cb + lane];
        unsigned mask = __ballot_sync(0xffffffffu, v >= 0 && (v >> 1) / per_warp == warp);
        while (mask) {
          const int l = __ffs(mask) - 1;
          mask &= mask - 1;
          const int code = __shfl_sync(0xffffffffu, v, l);
          const Acc x = xs[(cb + l) * kLd + lane];
          Acc* dst = acc + (code >> 1) * kLd + lane;
          *dst = (code & 1) ? *dst - x : *dst + x;
        }
      }
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < range * kRows; e += kThreads) {
    const int bb = e % range, rr = e / range;
    const long long r = r0 + rr, b = b0 + bb;
    if (r < n && b < b1) out[r * osr + b * osc] = acc[bb * kLd + rr];
  }
}

// Upper bound on the blocks a range of `range` buckets meets: floor(x + y) - floor(x) <= ceil(y).
long long max_blocks_met(long long range, long long k, long long s) {
  return std::min(s, ((range - 1) * s + k - 1) / k + 1);
}

std::size_t shared_bytes(int range, long long blocks, std::size_t acc_bytes) {
  return acc_bytes * (static_cast<std::size_t>(range) + kTileCols) * kLd + sizeof(int) * blocks * kTileCols;
}

template <typename T, typename Acc>
void launch(const SjltArgs& a, cudaStream_t stream) {
  const long long n = a.input.rows, k = a.out.cols, s = a.s;
  int device = 0, sms = 1, optin = 0;
  check_cuda(cudaGetDevice(&device), "reading the current device");
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "reading the SM count");
  check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             "reading the shared-memory limit");
  // At most 512 float or 256 double accumulators per row (66 KiB): with the staging
  // tile and the codes two CTAs fit an sm_90 SM (227 KiB), one an sm_80 SM (164 KiB).
  int range = sizeof(Acc) == 4 ? 512 : 256;
  const long long row_tiles = (n + kRows - 1) / kRows;
  while (range > kMinRange &&
         (range / 2 >= k || ((k + range - 1) / range) * std::min(row_tiles, kMaxRowTiles) < 2LL * sms))
    range /= 2;
  const std::size_t smem = shared_bytes(range, max_blocks_met(range, k, s), sizeof(Acc));
  check(smem <= static_cast<std::size_t>(optin),
        "sjlt (CUDA): needs " + std::to_string(smem) + " bytes of shared memory per block, this device allows " +
            std::to_string(optin));
  auto kernel = sjlt_kernel<T, Acc>;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
             "raising the shared-memory limit");
  const Acc scale = static_cast<Acc>(1.0 / std::sqrt(static_cast<double>(s)));
  const std::uint64_t key = sjlt::key(a.seed);
  const unsigned ranges = static_cast<unsigned>((k + range - 1) / range);
  for (long long t0 = 0; t0 < row_tiles; t0 += kMaxRowTiles) {
    const dim3 grid(ranges, static_cast<unsigned>(std::min(kMaxRowTiles, row_tiles - t0)));
    kernel<<<grid, kThreads, smem, stream>>>(a, t0 * kRows, key, scale, range);
    check_cuda(cudaGetLastError(), "launching the kernel");
  }
}

}  // namespace

void sjlt(const SjltArgs& args, std::uintptr_t stream_handle) {
  if (args.input.rows == 0 || args.input.cols == 0) return;
  check(args.out.cols >= 1 && args.out.cols <= kSjltMaxK && args.s >= 1 && args.s <= std::min(args.out.cols, kSjltMaxS),
        "sjlt (CUDA): need 1 <= s <= min(k, " + std::to_string(kSjltMaxS) + ") and k <= " +
            std::to_string(kSjltMaxK) + ", got s = " + std::to_string(args.s) + ", k = " + std::to_string(args.out.cols));
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  switch (args.dtype) {
    case DType::Float32: launch<float, float>(args, stream); break;
    case DType::Float64: launch<double, double>(args, stream); break;
    case DType::Float16: launch<__half, float>(args, stream); break;
    case DType::BFloat16: launch<__nv_bfloat16, float>(args, stream); break;
    default: check(false, "sjlt (CUDA): dtype must be float32, float64, float16 or bfloat16");
  }
}

}  // namespace torchfluence::cuda
