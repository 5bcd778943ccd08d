// CUDA influence-block kernel: scores = S @ G^T with the top-k selection done
// in the epilogue, so the (n_query, n_train) matrix never reaches device
// memory unless the caller asks for it.
//
// Grid: (column splits, query tiles). Each CTA owns BM query rows and walks a
// contiguous range of BN-wide training tiles. Per tile it computes the BM x BN
// scores with a shared-memory tiled FMA loop (float accumulation for
// float/half/bfloat16 inputs, double for double), stages them in shared memory,
// and one warp per query row merges them into that row's CTA-local top-k lists
// (in shared memory). At the end each CTA writes its lists to a workspace;
// a second small kernel merges the splits' lists with the running state.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <string>

#include "influence_block_cuda.h"

namespace torchfluence::cuda {
namespace {

constexpr int BM = 64, BN = 64, BK = 16;
static_assert(kMaxQueryRows == 65535LL * BM && kMaxTrainRows == 2147483647LL * BN, "limits follow the tiles");
constexpr int THREADS = 256;  // 16 x 16 threads, each a 4 x 4 micro-tile
constexpr int TM = BM / 16, TN = BN / 16;
constexpr int WARPS = THREADS / 32;

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("influence_block (CUDA): ") + what + ": " + cudaGetErrorString(err));
}

template <typename T> __device__ __forceinline__ float to_acc(T v, float) { return static_cast<float>(v); }
__device__ __forceinline__ float to_acc(__half v, float) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v, float) { return __bfloat162float(v); }
__device__ __forceinline__ double to_acc(double v, double) { return v; }

template <typename Acc>
__device__ __forceinline__ bool is_finite(Acc v) { return isfinite(v); }

// Total order of (value, index): better value first, lower index on ties;
// index -1 (empty) last.
template <typename Acc, bool Largest>
__device__ __forceinline__ bool ranks_before(Acc va, long long ia, Acc vb, long long ib) {
  if (ia < 0) return false;
  if (ib < 0) return true;
  if (va != vb) return Largest ? va > vb : va < vb;
  return ia < ib;
}

// A sorted list of up to k (value, index) pairs in shared memory, owned by
// one warp. `count` lives in a register of every lane.
template <typename Acc, bool Largest>
struct WarpList {
  Acc* values;
  long long* indices;
  int k;
  int count;

  __device__ bool accepts(Acc v, long long i) const {
    return count < k || ranks_before<Acc, Largest>(v, i, values[k - 1], indices[k - 1]);
  }

  // Inserts (v, i); all lanes of the warp call this with the same arguments.
  __device__ void insert(Acc v, long long i, int lane) {
    int pos = 0;
    for (int base = 0; base < count; base += 32) {
      const int q = base + lane;
      const bool before = q < count && ranks_before<Acc, Largest>(values[q], indices[q], v, i);
      pos += __popc(__ballot_sync(0xffffffffu, before));
    }
    if (pos >= k) return;
    const int last = min(count, k - 1);  // entries [pos, last) move one slot right
    Acc moved_v[2];
    long long moved_i[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int q = pos + lane + 32 * r;
      if (q < last) moved_v[r] = values[q], moved_i[r] = indices[q];
    }
    __syncwarp();
    // Lists longer than 64 are not used on this path (checked on the host).
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int q = pos + lane + 32 * r;
      if (q < last) values[q + 1] = moved_v[r], indices[q + 1] = moved_i[r];
    }
    if (lane == 0) values[pos] = v, indices[pos] = i;
    __syncwarp();
    count = min(count + 1, k);
  }

  // Offers 32 candidates at once (one per lane); `valid` marks real ones.
  __device__ void offer(Acc v, long long i, bool valid, int lane) {
    unsigned pending = __ballot_sync(0xffffffffu, valid && accepts(v, i));
    while (pending) {
      const int src = __ffs(pending) - 1;
      pending &= pending - 1;
      const Acc cv = __shfl_sync(0xffffffffu, v, src);
      const long long ci = __shfl_sync(0xffffffffu, i, src);
      if (accepts(cv, ci)) insert(cv, ci, lane);  // the threshold may have moved
    }
  }
};

template <typename Acc>
struct SplitLists {
  // Workspace layout: [n_query, splits, k] per array.
  Acc* largest_values;
  long long* largest_indices;
  Acc* smallest_values;
  long long* smallest_indices;
};

template <typename In, typename Acc>
__global__ void __launch_bounds__(THREADS)
block_scores_topk_kernel(const In* __restrict__ S, long long s_row, long long s_col,   // [n_query, p]
                         const In* __restrict__ G, long long g_row, long long g_col,   // [b, p]
                         long long n_query, long long b, long long p, long long offset,
                         Acc* __restrict__ out, long long out_row, long long out_col,  // [n_query, b] or null
                         int k, int tiles_per_split, SplitLists<Acc> lists,
                         long long* __restrict__ status) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Acc* As = reinterpret_cast<Acc*>(smem_raw);  // [BK][BM + 1]
  Acc* Bs = As + BK * (BM + 1);                 // [BK][BN + 1]
  Acc* Cs = Bs + BK * (BN + 1);                 // [BM][BN + 1]
  Acc* list_values = Cs + BM * (BN + 1);        // [2][BM][k]
  long long* list_indices = reinterpret_cast<long long*>(list_values + 2 * BM * k);  // [2][BM][k]

  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int lane = tid % 32, warp = tid / 32;
  const long long m0 = static_cast<long long>(blockIdx.y) * BM;
  const long long first_tile = static_cast<long long>(blockIdx.x) * tiles_per_split;
  const long long n_tiles = (b + BN - 1) / BN;
  const long long last_tile = min(first_tile + tiles_per_split, n_tiles);

  // Each warp owns rows warp, warp + WARPS, ...; counts stay in registers.
  int counts_largest[BM / WARPS] = {}, counts_smallest[BM / WARPS] = {};

  for (long long tile = first_tile; tile < last_tile; ++tile) {
    const long long n0 = tile * BN;
    Acc acc[TM][TN] = {};
    for (long long k0 = 0; k0 < p; k0 += BK) {
      // Each thread stages BM*BK/THREADS elements of each operand; consecutive
      // threads read consecutive parameters (coalesced when stride_col == 1).
      for (int e = tid; e < BM * BK; e += THREADS) {
        const int r = e / BK, kk = e % BK;
        const long long row = m0 + r, col = k0 + kk;
        As[kk * (BM + 1) + r] = (row < n_query && col < p) ? to_acc(S[row * s_row + col * s_col], Acc(0)) : Acc(0);
      }
      for (int e = tid; e < BN * BK; e += THREADS) {
        const int r = e / BK, kk = e % BK;
        const long long row = n0 + r, col = k0 + kk;
        Bs[kk * (BN + 1) + r] = (row < b && col < p) ? to_acc(G[row * g_row + col * g_col], Acc(0)) : Acc(0);
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < BK; ++kk) {
        Acc a_frag[TM], b_frag[TN];
#pragma unroll
        for (int i = 0; i < TM; ++i) a_frag[i] = As[kk * (BM + 1) + ty + 16 * i];
#pragma unroll
        for (int j = 0; j < TN; ++j) b_frag[j] = Bs[kk * (BN + 1) + tx + 16 * j];
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
          for (int j = 0; j < TN; ++j) acc[i][j] += a_frag[i] * b_frag[j];
      }
      __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) Cs[(ty + 16 * i) * (BN + 1) + tx + 16 * j] = acc[i][j];
    __syncthreads();

    // Epilogue, one warp per row: finiteness, optional store, top-k merge.
#pragma unroll
    for (int rr = 0; rr < BM / WARPS; ++rr) {
      const int r = warp + rr * WARPS;
      const long long row = m0 + r;
      if (row >= n_query) continue;
      WarpList<Acc, true> largest{list_values + r * k, list_indices + r * k, k, counts_largest[rr]};
      WarpList<Acc, false> smallest{list_values + (BM + r) * k, list_indices + (BM + r) * k, k,
                                    counts_smallest[rr]};
      for (int c0 = 0; c0 < BN; c0 += 32) {
        const long long col = n0 + c0 + lane;
        const Acc v = Cs[r * (BN + 1) + c0 + lane];
        const bool in_range = col < b;
        const bool finite = is_finite(v);
        // One atomic per warp and 32 columns that hold a non-finite score.
        const unsigned bad = __ballot_sync(0xffffffffu, in_range && !finite);
        if (bad != 0u && lane == 0) {
          const auto count = static_cast<unsigned long long>(__popc(bad));
          if (atomicAdd(reinterpret_cast<unsigned long long*>(status), count) == 0ull) {
            status[1] = row;
            status[2] = offset + n0 + c0 + (__ffs(bad) - 1);
          }
        }
        if (in_range && out) out[row * out_row + col * out_col] = v;
        if (k > 0) {
          const bool valid = in_range && finite;
          largest.offer(v, offset + col, valid, lane);
          smallest.offer(v, offset + col, valid, lane);
        }
      }
      counts_largest[rr] = largest.count;
      counts_smallest[rr] = smallest.count;
    }
    __syncthreads();
  }

  if (k == 0) return;
  // Hand this split's lists to the merge kernel; unfilled slots get index -1.
#pragma unroll
  for (int rr = 0; rr < BM / WARPS; ++rr) {
    const int r = warp + rr * WARPS;
    const long long row = m0 + r;
    if (row >= n_query) continue;
    const long long dst = (row * gridDim.x + blockIdx.x) * k;
    for (int q = lane; q < k; q += 32) {
      const bool l_ok = q < counts_largest[rr], s_ok = q < counts_smallest[rr];
      lists.largest_values[dst + q] = l_ok ? list_values[r * k + q] : Acc(0);
      lists.largest_indices[dst + q] = l_ok ? list_indices[r * k + q] : -1;
      lists.smallest_values[dst + q] = s_ok ? list_values[(BM + r) * k + q] : Acc(0);
      lists.smallest_indices[dst + q] = s_ok ? list_indices[(BM + r) * k + q] : -1;
    }
  }
}

// One warp per query row: merge the running state (k) and every split's list
// (splits x k) into the new state.
template <typename Acc, bool Largest>
__device__ void merge_row(Acc* state_v, long long* state_i, const Acc* split_v, const long long* split_i,
                          int k, int splits, Acc* scratch_v, long long* scratch_i, int lane) {
  WarpList<Acc, Largest> list{scratch_v, scratch_i, k, 0};
  for (int c0 = 0; c0 < k; c0 += 32) {
    const int q = c0 + lane;
    const bool valid = q < k && state_i[q] >= 0;
    list.offer(valid ? state_v[q] : Acc(0), valid ? state_i[q] : -1, valid, lane);
  }
  const int total = splits * k;
  for (int c0 = 0; c0 < total; c0 += 32) {
    const int q = c0 + lane;
    const bool valid = q < total && split_i[q] >= 0;
    list.offer(valid ? split_v[q] : Acc(0), valid ? split_i[q] : -1, valid, lane);
  }
  __syncwarp();
  for (int q = lane; q < k; q += 32) {
    if (q < list.count) state_v[q] = scratch_v[q], state_i[q] = scratch_i[q];
  }
}

template <typename Acc>
__global__ void merge_splits_kernel(long long n_query, int k, int splits, SplitLists<Acc> lists,
                                    Acc* lv, long long* li, Acc* sv, long long* si) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const long long row = static_cast<long long>(blockIdx.x) * WARPS + warp;
  if (row >= n_query) return;
  Acc* scratch_v = reinterpret_cast<Acc*>(smem_raw) + warp * k;
  long long* scratch_i = reinterpret_cast<long long*>(reinterpret_cast<Acc*>(smem_raw) + WARPS * k) + warp * k;
  const long long base = row * splits * k;
  merge_row<Acc, true>(lv + row * k, li + row * k, lists.largest_values + base, lists.largest_indices + base, k,
                       splits, scratch_v, scratch_i, lane);
  __syncwarp();
  merge_row<Acc, false>(sv + row * k, si + row * k, lists.smallest_values + base, lists.smallest_indices + base,
                        k, splits, scratch_v, scratch_i, lane);
}

template <typename In, typename Acc>
void launch(const InfluenceBlockArgs& a, std::uintptr_t workspace, int splits, cudaStream_t stream) {
  const long long n_query = a.queries.rows, b = a.train.rows, p = a.queries.cols;
  if (n_query == 0 || b == 0) return;
  const int k = static_cast<int>(a.topk.k());
  const long long n_tiles = (b + BN - 1) / BN;
  if (k == 0) splits = static_cast<int>(std::min<long long>(n_tiles, 65535));
  const int tiles_per_split = static_cast<int>((n_tiles + splits - 1) / splits);
  splits = static_cast<int>((n_tiles + tiles_per_split - 1) / tiles_per_split);

  SplitLists<Acc> lists{};
  if (k > 0) {
    const long long n = n_query * splits * k;
    auto* base = reinterpret_cast<unsigned char*>(workspace);
    lists.largest_values = reinterpret_cast<Acc*>(base);
    lists.smallest_values = lists.largest_values + n;
    lists.largest_indices = reinterpret_cast<long long*>(lists.smallest_values + n);
    lists.smallest_indices = lists.largest_indices + n;
  }
  const size_t smem = static_cast<size_t>(influence_block_shared_bytes(k, sizeof(Acc)));
  int device = 0, optin = 0;
  check_cuda(cudaGetDevice(&device), "reading the current device");
  check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             "reading the shared-memory limit");
  check(smem <= static_cast<size_t>(optin),
        "influence_block (CUDA): k = " + std::to_string(k) + " needs " + std::to_string(smem) +
            " bytes of shared memory per block for this dtype, this device allows " + std::to_string(optin) +
            "; use a smaller k or the matmul + topk_merge route");
  auto kernel = block_scores_topk_kernel<In, Acc>;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
             "raising the shared-memory limit");
  const dim3 grid(splits, static_cast<unsigned>((n_query + BM - 1) / BM));
  kernel<<<grid, THREADS, smem, stream>>>(
      reinterpret_cast<const In*>(a.queries.data), a.queries.stride_row, a.queries.stride_col,
      reinterpret_cast<const In*>(a.train.data), a.train.stride_row, a.train.stride_col, n_query, b, p, a.offset,
      reinterpret_cast<Acc*>(a.scores.data), a.scores.stride_row, a.scores.stride_col, k, tiles_per_split, lists,
      reinterpret_cast<long long*>(a.status.data));
  check_cuda(cudaGetLastError(), "launching the block kernel");
  if (k == 0) return;
  const size_t merge_smem = (sizeof(Acc) + sizeof(long long)) * WARPS * k;
  merge_splits_kernel<Acc><<<static_cast<unsigned>((n_query + WARPS - 1) / WARPS), THREADS, merge_smem, stream>>>(
      n_query, k, splits, lists, reinterpret_cast<Acc*>(a.topk.largest_values.data),
      reinterpret_cast<long long*>(a.topk.largest_indices.data), reinterpret_cast<Acc*>(a.topk.smallest_values.data),
      reinterpret_cast<long long*>(a.topk.smallest_indices.data));
  check_cuda(cudaGetLastError(), "launching the merge kernel");
}

}  // namespace

std::int64_t influence_block_shared_bytes(std::int64_t k, std::int64_t acc_bytes) {
  return acc_bytes * (BK * (BM + 1) + BK * (BN + 1) + BM * (BN + 1)) + (acc_bytes + 8) * 2 * BM * k;
}

int influence_block_splits(std::int64_t n_query, std::int64_t b, std::int64_t k, int num_sms) {
  if (k == 0 || n_query == 0 || b == 0) return 1;
  const long long query_tiles = (n_query + BM - 1) / BM;
  const long long n_tiles = (b + BN - 1) / BN;
  // At most two full waves on the chip (rounded down: one CTA over a wave would cost a
  // whole extra wave), never more than one CTA per tile.
  const long long wanted = (2LL * num_sms) / query_tiles;
  return static_cast<int>(std::max<long long>(1, std::min<long long>(wanted, std::min<long long>(n_tiles, 65535))));
}

void influence_block(const InfluenceBlockArgs& args, std::uintptr_t workspace, int splits, std::uintptr_t stream) {
  check(args.topk.k() >= 1 && args.topk.k() <= kMaxFusedTopK,
        "influence_block (CUDA): fused top-k supports 1 <= k <= " + std::to_string(kMaxFusedTopK) + ", got " +
            std::to_string(args.topk.k()));
  check(args.queries.rows <= kMaxQueryRows, "influence_block (CUDA): at most " + std::to_string(kMaxQueryRows) +
                                                " query rows per launch, got " + std::to_string(args.queries.rows));
  check(args.train.rows <= kMaxTrainRows, "influence_block (CUDA): at most " + std::to_string(kMaxTrainRows) +
                                              " training rows per launch, got " + std::to_string(args.train.rows));
  check(splits >= 1 && splits <= 65535, "influence_block (CUDA): splits must be in [1, 65535], got " +
                                            std::to_string(splits));
  auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (args.dtype) {
    case DType::Float32: launch<float, float>(args, workspace, splits, s); break;
    case DType::Float64: launch<double, double>(args, workspace, splits, s); break;
    case DType::Float16: launch<__half, float>(args, workspace, splits, s); break;
    case DType::BFloat16: launch<__nv_bfloat16, float>(args, workspace, splits, s); break;
  }
}

std::string runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}

}  // namespace torchfluence::cuda
