// CUDA topk_merge: one block of precomputed scores merged into running
// per-query top-k lists. One CTA per query row (rows strided over the grid).
//
// A CTA walks its row CHUNK scores at a time. Each thread screens its scores
// against the list's current k-th entry; the few that pass are compacted into
// shared memory, bitonic-sorted, and merged into the list in place:
//   - a candidate's final slot is its rank among the candidates plus the
//     number of list entries that rank before it (binary search in the list);
//   - a list entry moves right by the number of candidates that rank before it
//     (binary search in the candidates). Entries only move right, so the list
//     is rewritten in tiles from its end: each tile is read whole before any
//     of it is written, and lands only on slots already read.
// Once a list is full most chunks have no candidate and cost one compare per
// score. Non-finite scores are counted per thread and reported with one
// atomic per CTA; the last CTA to finish folds the counts into `status`.
#include <cuda_runtime.h>

#include <climits>
#include <stdexcept>
#include <string>

#include "topk_merge_cuda.h"

namespace torchfluence::cuda {
namespace {

constexpr int THREADS = 256;
constexpr int PER_THREAD = 4;
constexpr int CHUNK = THREADS * PER_THREAD;  // scores screened per step; also the candidate capacity
constexpr int WARPS = THREADS / 32;
constexpr unsigned kMaxBlocks = 65535;       // rows beyond this are strided over the grid

// Total order of (value, index): better value first, lower index on ties;
// index -1 (empty) last.
template <typename T, bool Largest>
__device__ __forceinline__ bool ranks_before(T va, long long ia, T vb, long long ib) {
  if (ia < 0) return false;
  if (ib < 0) return true;
  if (va != vb) return Largest ? va > vb : va < vb;
  return ia < ib;
}

template <typename T>
struct Shared {
  T cand_values[CHUNK];
  long long cand_indices[CHUNK];
  long long target[CHUNK];  // final slot of each sorted candidate (>= k: dropped)
  int n_cand;
  long long warp_count[WARPS];
  long long warp_key[WARPS];
  bool last_block;
};

// Merges the accepted scores of one chunk (held in registers) into the list
// (values, indices)[0..k). Every thread of the CTA calls this.
template <typename T, bool Largest>
__device__ void merge_chunk(const T (&v)[PER_THREAD], const bool (&finite)[PER_THREAD], long long first_index,
                            T* values, long long* indices, long long k, Shared<T>& sh) {
  const int tid = threadIdx.x, lane = tid % 32;
  const T bound_v = values[k - 1];
  const long long bound_i = indices[k - 1];
  if (tid == 0) sh.n_cand = 0;
  __syncthreads();
#pragma unroll
  for (int r = 0; r < PER_THREAD; ++r) {
    const long long index = first_index + r * THREADS + tid;
    const bool accept = finite[r] && ranks_before<T, Largest>(v[r], index, bound_v, bound_i);
    const unsigned ballot = __ballot_sync(0xffffffffu, accept);
    int base = 0;
    if (lane == 0 && ballot != 0u) base = atomicAdd(&sh.n_cand, __popc(ballot));
    base = __shfl_sync(0xffffffffu, base, 0);
    if (accept) {
      const int pos = base + __popc(ballot & ((1u << lane) - 1u));
      sh.cand_values[pos] = v[r];
      sh.cand_indices[pos] = index;
    }
  }
  __syncthreads();
  const int m = sh.n_cand;
  __syncthreads();  // everyone has read n_cand before the next chunk resets it
  if (m == 0) return;

  // Bitonic sort of the candidates, padded with empty entries to a power of two.
  int padded = 1;
  while (padded < m) padded <<= 1;
  for (int e = m + tid; e < padded; e += THREADS) sh.cand_values[e] = T(0), sh.cand_indices[e] = -1;
  __syncthreads();
  for (int size = 2; size <= padded; size <<= 1) {
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int e = tid; e < padded / 2; e += THREADS) {
        const int i = 2 * stride * (e / stride) + e % stride, j = i + stride;
        const T vi = sh.cand_values[i], vj = sh.cand_values[j];
        const long long ii = sh.cand_indices[i], ij = sh.cand_indices[j];
        const bool ascending = (i & size) == 0;
        if (ascending ? ranks_before<T, Largest>(vj, ij, vi, ii) : ranks_before<T, Largest>(vi, ii, vj, ij)) {
          sh.cand_values[i] = vj, sh.cand_indices[i] = ij;
          sh.cand_values[j] = vi, sh.cand_indices[j] = ii;
        }
      }
      __syncthreads();
    }
  }

  // Filled slots (empty ones sort last), and the final slots of the
  // candidates, against the list as it was.
  long long filled_lo = 0, filled_hi = k;
  while (filled_lo < filled_hi) {
    const long long mid = filled_lo + (filled_hi - filled_lo) / 2;
    if (indices[mid] >= 0) filled_lo = mid + 1;
    else filled_hi = mid;
  }
  const long long filled = filled_lo;
  for (int e = tid; e < m; e += THREADS) {
    const T cv = sh.cand_values[e];
    const long long ci = sh.cand_indices[e];
    long long lo = 0, hi = k;
    while (lo < hi) {
      const long long mid = lo + (hi - lo) / 2;
      if (ranks_before<T, Largest>(values[mid], indices[mid], cv, ci)) lo = mid + 1;
      else hi = mid;
    }
    sh.target[e] = e + lo;
  }
  __syncthreads();

  // Entries before the best candidate stay; the filled ones after it move
  // right, tile by tile from the end. Slot k - 1 can only be dropped (at least
  // one candidate ranks before it); empty slots never move.
  const long long first_moved = sh.target[0];
  for (long long tile_end = min(k - 1, filled); tile_end > first_moved; tile_end -= THREADS) {
    const long long j = tile_end - 1 - tid;
    T lv = T(0);
    long long li = -1;
    if (j >= first_moved) lv = values[j], li = indices[j];
    long long shift = 0;
    if (li >= 0) {
      int lo = 0, hi = m;
      while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (ranks_before<T, Largest>(sh.cand_values[mid], sh.cand_indices[mid], lv, li)) lo = mid + 1;
        else hi = mid;
      }
      shift = lo;
    }
    __syncthreads();  // the whole tile is read before any of it is overwritten
    if (li >= 0 && j + shift < k) values[j + shift] = lv, indices[j + shift] = li;
    __syncthreads();
  }
  for (int e = tid; e < m; e += THREADS) {
    const long long t = sh.target[e];
    if (t < k) values[t] = sh.cand_values[e], indices[t] = sh.cand_indices[e];
  }
  __syncthreads();
}

// workspace: [non-finite count, LLONG_MAX - first (row * b + col), CTAs done], zeroed before launch.
template <typename T>
__global__ void __launch_bounds__(THREADS)
topk_merge_kernel(const T* __restrict__ scores, long long s_row, long long s_col,  // [n_query, b]
                  long long n_query, long long b, long long offset,
                  T* largest_values, long long* largest_indices,                   // [n_query, k]
                  T* smallest_values, long long* smallest_indices,                 // [n_query, k]
                  long long k, unsigned long long* workspace, long long* status) {
  __shared__ Shared<T> sh;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  long long bad_count = 0, bad_key = LLONG_MAX;

  for (long long row = blockIdx.x; row < n_query; row += gridDim.x) {
    const T* src = scores + row * s_row;
    for (long long c0 = 0; c0 < b; c0 += CHUNK) {
      T v[PER_THREAD];
      bool finite[PER_THREAD];
#pragma unroll
      for (int r = 0; r < PER_THREAD; ++r) {
        const long long col = c0 + r * THREADS + tid;  // consecutive threads, consecutive columns
        const bool in_range = col < b;
        v[r] = in_range ? src[col * s_col] : T(0);
        finite[r] = in_range && isfinite(v[r]);
        if (in_range && !finite[r]) {
          ++bad_count;
          bad_key = min(bad_key, row * b + col);
        }
      }
      merge_chunk<T, true>(v, finite, offset + c0, largest_values + row * k, largest_indices + row * k, k, sh);
      merge_chunk<T, false>(v, finite, offset + c0, smallest_values + row * k, smallest_indices + row * k, k, sh);
    }
  }

  // One atomic per CTA for the non-finite count and the row-major first position.
  for (int delta = 16; delta > 0; delta >>= 1) {
    bad_count += __shfl_down_sync(0xffffffffu, bad_count, delta);
    bad_key = min(bad_key, __shfl_down_sync(0xffffffffu, bad_key, delta));
  }
  if (lane == 0) sh.warp_count[warp] = bad_count, sh.warp_key[warp] = bad_key;
  __syncthreads();
  if (tid == 0) {
    long long count = 0, key = LLONG_MAX;
    for (int w = 0; w < WARPS; ++w) count += sh.warp_count[w], key = min(key, sh.warp_key[w]);
    if (count > 0) {
      atomicAdd(&workspace[0], static_cast<unsigned long long>(count));
      atomicMax(&workspace[1], static_cast<unsigned long long>(LLONG_MAX - key));
    }
    __threadfence();
    sh.last_block = atomicAdd(&workspace[2], 1ull) == gridDim.x - 1;
  }
  __syncthreads();
  if (!sh.last_block || tid != 0) return;
  __threadfence();
  const unsigned long long count = atomicAdd(&workspace[0], 0ull);
  if (count == 0) return;
  const long long key = LLONG_MAX - static_cast<long long>(atomicAdd(&workspace[1], 0ull));
  if (status[0] == 0) status[1] = key / b, status[2] = offset + key % b;
  status[0] += static_cast<long long>(count);
}

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("topk_merge (CUDA): ") + what + ": " + cudaGetErrorString(err));
}

template <typename T>
void launch(const TopKMergeArgs& a, std::uintptr_t workspace, cudaStream_t stream) {
  const long long n_query = a.scores.rows, b = a.scores.cols;
  auto* ws = reinterpret_cast<unsigned long long*>(workspace);
  check_cuda(cudaMemsetAsync(ws, 0, kTopKMergeWorkspaceBytes, stream), "clearing the workspace");
  const unsigned blocks = static_cast<unsigned>(n_query < kMaxBlocks ? n_query : kMaxBlocks);
  topk_merge_kernel<T><<<blocks, THREADS, 0, stream>>>(
      reinterpret_cast<const T*>(a.scores.data), a.scores.stride_row, a.scores.stride_col, n_query, b, a.offset,
      reinterpret_cast<T*>(a.topk.largest_values.data), reinterpret_cast<long long*>(a.topk.largest_indices.data),
      reinterpret_cast<T*>(a.topk.smallest_values.data), reinterpret_cast<long long*>(a.topk.smallest_indices.data),
      a.topk.k(), ws, reinterpret_cast<long long*>(a.status.data));
  check_cuda(cudaGetLastError(), "launching the merge kernel");
}

}  // namespace

void topk_merge(const TopKMergeArgs& args, std::uintptr_t workspace, std::uintptr_t stream_handle) {
  if (args.scores.rows == 0 || args.scores.cols == 0) return;
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  switch (static_cast<DType>(args.scores.dtype)) {
    case DType::Float32: launch<float>(args, workspace, stream); break;
    case DType::Float64: launch<double>(args, workspace, stream); break;
    default: check(false, "topk_merge (CUDA): scores must be float32 or float64");
  }
}

}  // namespace torchfluence::cuda
