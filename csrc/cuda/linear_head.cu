// CUDA linear-head HVP in three launches over one block of samples:
//   1. per sample: logits, then the probabilities (CE) or sigmoid slopes (BCE);
//   2. per (vector, sample): u = V[v] x~_i and r = h_i u, into the workspace;
//   3. per (vector, class, column): out += (1/n_total) sum_i r[v,i,c] x~_i[j]
//      (consecutive threads read consecutive columns of the same sample row).
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "linear_head_cuda.h"

namespace torchfluence::cuda {
namespace {

constexpr int THREADS = 256;
static_assert(kHeadMaxVectorSamples == 2147483647LL * THREADS, "one thread per (vector, sample)");

template <typename T>
__global__ void probabilities(LinearHeadArgs a, T* prob) {
  const long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x;
  const long long n = a.features.rows, d = a.features.cols, C = a.weight.rows;
  if (i >= n) return;
  const T* X = reinterpret_cast<const T*>(a.features.data);
  const T* W = reinterpret_cast<const T*>(a.weight.data);
  const T* b = reinterpret_cast<const T*>(a.bias.data);
  T* p = prob + i * C;
  T top = -INFINITY;
  for (long long c = 0; c < C; ++c) {
    T z = b ? b[c] : T(0);
    for (long long j = 0; j < d; ++j)
      z += W[c * a.weight.stride_row + j * a.weight.stride_col] * X[i * a.features.stride_row + j * a.features.stride_col];
    p[c] = z;
    top = z > top ? z : top;
  }
  if (a.loss == HeadLoss::CrossEntropy) {
    T total = 0;
    for (long long c = 0; c < C; ++c) total += (p[c] = exp(p[c] - top));
    for (long long c = 0; c < C; ++c) p[c] /= total;
  } else if (a.loss == HeadLoss::BCEWithLogits) {
    for (long long c = 0; c < C; ++c) {
      const T s = T(1) / (T(1) + exp(-p[c]));
      p[c] = s * (T(1) - s) / static_cast<T>(C);
    }
  }
}

template <typename T>
__global__ void curvature_times_u(LinearHeadArgs a, const T* prob, T* r) {
  const long long t = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x;
  const long long n = a.features.rows, d = a.features.cols, C = a.weight.rows;
  if (t >= a.k() * n) return;
  const long long v = t / n, i = t % n, d1 = d + (a.has_bias() ? 1 : 0);
  const T* X = reinterpret_cast<const T*>(a.features.data);
  const T* V = reinterpret_cast<const T*>(a.vectors.data) + v * C * d1;
  const T* p = prob + i * C;
  T* ri = r + (v * n + i) * C;
  T pu = 0;
  for (long long c = 0; c < C; ++c) {
    T u = a.has_bias() ? V[c * d1 + d] : T(0);
    for (long long j = 0; j < d; ++j) u += V[c * d1 + j] * X[i * a.features.stride_row + j * a.features.stride_col];
    ri[c] = u;
    pu += p[c] * u;
  }
  for (long long c = 0; c < C; ++c) {
    if (a.loss == HeadLoss::CrossEntropy) ri[c] = p[c] * (ri[c] - pu);
    else if (a.loss == HeadLoss::MSE) ri[c] *= T(2) / static_cast<T>(C);
    else ri[c] *= p[c];
  }
}

template <typename T>
__global__ void accumulate(LinearHeadArgs a, const T* r) {
  const long long n = a.features.rows, d = a.features.cols, C = a.weight.rows, d1 = d + (a.has_bias() ? 1 : 0);
  const long long j = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x;
  const long long vc = blockIdx.y;  // (vector, class)
  if (j >= d1) return;
  const long long v = vc / C, c = vc % C;
  const T* X = reinterpret_cast<const T*>(a.features.data);
  T sum = 0;
  for (long long i = 0; i < n; ++i) {
    const T x = j < d ? X[i * a.features.stride_row + j * a.features.stride_col] : T(1);
    sum += r[(v * n + i) * C + c] * x;
  }
  reinterpret_cast<T*>(a.out.data)[vc * d1 + j] += sum / static_cast<T>(a.n_total);
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("linear_head_hvp (CUDA): ") + what + ": " + cudaGetErrorString(err));
}

template <typename T>
void launch(const LinearHeadArgs& a, cudaStream_t stream) {
  const long long n = a.features.rows, C = a.weight.rows, d1 = a.features.cols + (a.has_bias() ? 1 : 0);
  check(a.k() * C <= kHeadMaxVectorClasses, "linear_head_hvp (CUDA): k * C must be <= " +
                                                std::to_string(kHeadMaxVectorClasses) + " per call, got " +
                                                std::to_string(a.k() * C));
  check(a.k() * n <= kHeadMaxVectorSamples, "linear_head_hvp (CUDA): k * n must be <= " +
                                                std::to_string(kHeadMaxVectorSamples) + " per call, got " +
                                                std::to_string(a.k() * n));
  T* prob = reinterpret_cast<T*>(a.workspace);
  T* r = prob + n * C;
  probabilities<T><<<static_cast<unsigned>((n + THREADS - 1) / THREADS), THREADS, 0, stream>>>(a, prob);
  check_launch("probabilities");
  curvature_times_u<T><<<static_cast<unsigned>((a.k() * n + THREADS - 1) / THREADS), THREADS, 0, stream>>>(a, prob, r);
  check_launch("curvature_times_u");
  const dim3 grid(static_cast<unsigned>((d1 + THREADS - 1) / THREADS), static_cast<unsigned>(a.k() * C));
  accumulate<T><<<grid, THREADS, 0, stream>>>(a, r);
  check_launch("accumulate");
}

}  // namespace

void linear_head_hvp(const LinearHeadArgs& args, std::uintptr_t stream_handle) {
  if (args.features.rows == 0 || args.k() == 0 || args.weight.rows == 0) return;
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  switch (args.dtype) {
    case DType::Float32: launch<float>(args, stream); break;
    case DType::Float64: launch<double>(args, stream); break;
    default: check(false, "linear_head_hvp (CUDA): dtype must be float32 or float64");
  }
}

}  // namespace torchfluence::cuda
