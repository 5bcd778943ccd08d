// CUDA psg_dot: scores[q, j] += <Q_q, G_j>, G_j = sum_t D[j,t] A[j,t]^T.
//
// A GEMM of queries against per-sample gradients in which the gradient tile is
// built in shared memory from the captured activations and output gradients,
// so no per-sample gradient is ever written to device memory. Grid: (sample
// tiles, query tiles); each CTA owns BQ queries x BJ samples and walks the
// flattened (d_out, d_in) dimension BK at a time. Accumulation is float for
// float/half/bfloat16 inputs and double for double.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "psg_dot_cuda.h"

namespace torchfluence::cuda {
namespace {

constexpr int BQ = 32, BJ = 32, BK = 32;
constexpr int THREADS = 256;  // 8 x 32 threads; each owns 4 queries of one sample column
constexpr int TQ = BQ * BJ / THREADS;
static_assert(kPsgDotMaxQueryRows == 65535LL * BQ && kPsgDotMaxSamples == 2147483647LL * BJ, "limits follow the tiles");

template <typename T> __device__ __forceinline__ float load(const T* p) { return static_cast<float>(*p); }
template <> __device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
template <> __device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ double load(const double* p) { return *p; }

template <typename T, typename Acc>
__global__ void __launch_bounds__(THREADS) psg_dot_kernel(PsgDotArgs a) {
  __shared__ Acc q_tile[BK][BQ + 1];  // +1: no bank conflicts on the transposed store
  __shared__ Acc g_tile[BK][BJ + 1];
  const auto& As = a.activations;
  const auto& Ds = a.output_grads;
  const T* Q = reinterpret_cast<const T*>(a.queries.data);
  const T* A = reinterpret_cast<const T*>(As.data);
  const T* D = reinterpret_cast<const T*>(Ds.data);
  Acc* out = reinterpret_cast<Acc*>(a.scores.data);
  const long long n_query = a.queries.rows, p = a.queries.cols, b = As.n, d_in = As.d, positions = As.t;
  const long long q0 = static_cast<long long>(blockIdx.y) * BQ, j0 = static_cast<long long>(blockIdx.x) * BJ;
  const int tx = threadIdx.x % BJ, ty = threadIdx.x / BJ;  // sample column, query group

  Acc acc[TQ];
#pragma unroll
  for (int r = 0; r < TQ; ++r) acc[r] = Acc(0);

  for (long long k0 = 0; k0 < p; k0 += BK) {
    // Query tile: q_tile[kk][qq] = Q[q0 + qq, k0 + kk].
    for (int e = threadIdx.x; e < BK * BQ; e += THREADS) {
      const int qq = e / BK, kk = e % BK;
      const long long q = q0 + qq, k = k0 + kk;
      q_tile[kk][qq] = (q < n_query && k < p) ? load(Q + q * a.queries.stride_row + k * a.queries.stride_col)
                                              : Acc(0);
    }
    // Gradient tile: g_tile[kk][jj] = sum_t D[j, t, o] A[j, t, i] with (o, i) = divmod(k0 + kk, d_in).
    for (int e = threadIdx.x; e < BK * BJ; e += THREADS) {
      const int jj = e / BK, kk = e % BK;
      const long long j = j0 + jj, k = k0 + kk;
      Acc g = Acc(0);
      if (j < b && k < p) {
        const long long o = k / d_in, i = k - o * d_in;
        const T* a_ptr = A + j * As.stride_n + i * As.stride_d;
        const T* d_ptr = D + j * Ds.stride_n + o * Ds.stride_d;
        for (long long t = 0; t < positions; ++t) g += load(d_ptr + t * Ds.stride_t) * load(a_ptr + t * As.stride_t);
      }
      g_tile[kk][jj] = g;
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < BK; ++kk) {
      const Acc g = g_tile[kk][tx];
#pragma unroll
      for (int r = 0; r < TQ; ++r) acc[r] += q_tile[kk][ty * TQ + r] * g;
    }
    __syncthreads();
  }
  const long long j = j0 + tx;
  if (j >= b) return;
#pragma unroll
  for (int r = 0; r < TQ; ++r) {
    const long long q = q0 + ty * TQ + r;
    if (q < n_query) out[q * a.scores.stride_row + j * a.scores.stride_col] += acc[r];
  }
}

template <typename T, typename Acc>
void launch(const PsgDotArgs& a, cudaStream_t stream) {
  check(a.queries.rows <= kPsgDotMaxQueryRows, "psg_dot (CUDA): at most " + std::to_string(kPsgDotMaxQueryRows) +
                                                   " queries per call, got " + std::to_string(a.queries.rows));
  check(a.activations.n <= kPsgDotMaxSamples, "psg_dot (CUDA): at most " + std::to_string(kPsgDotMaxSamples) +
                                                 " samples per call, got " + std::to_string(a.activations.n));
  const dim3 grid(static_cast<unsigned>((a.activations.n + BJ - 1) / BJ),
                  static_cast<unsigned>((a.queries.rows + BQ - 1) / BQ));
  psg_dot_kernel<T, Acc><<<grid, THREADS, 0, stream>>>(a);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("psg_dot (CUDA): launch failed: ") + cudaGetErrorString(err));
}

}  // namespace

void psg_dot(const PsgDotArgs& args, std::uintptr_t stream_handle) {
  if (args.queries.rows == 0 || args.activations.n == 0 || args.queries.cols == 0) return;
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  switch (args.dtype) {
    case DType::Float32: launch<float, float>(args, stream); break;
    case DType::Float64: launch<double, double>(args, stream); break;
    case DType::Float16: launch<__half, float>(args, stream); break;
    case DType::BFloat16: launch<__nv_bfloat16, float>(args, stream); break;
  }
}

}  // namespace torchfluence::cuda
