// Shared types for the kernels: raw views of caller-owned memory.
//
// The extension never links libtorch. Python allocates every tensor and
// passes data pointers, shapes, strides (in elements) and element types, so
// one build loads under any torch release, and the bindings can verify every
// array a kernel writes before it writes it. Each op's argument struct is in
// csrc/<op>_args.h.
#pragma once

#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>

// Lets the small accessors below run in device code too.
#ifdef __CUDACC__
#define TORCHFLUENCE_HOST_DEVICE __host__ __device__
#else
#define TORCHFLUENCE_HOST_DEVICE
#endif

namespace torchfluence {

// Element types. Values match ELEMENT_CODES in python/torchfluence/ops/_common.py (the first four
// also DTYPE_CODES, the kernels' input types).
enum class DType : int { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3, Int64 = 4 };

inline bool is_input_dtype(int code) { return code >= 0 && code <= 3; }

// Dtype of scores and top-k values for inputs of `dtype` (float64 stays float64).
inline DType accumulation_dtype(DType dtype) { return dtype == DType::Float64 ? DType::Float64 : DType::Float32; }

inline std::int64_t element_size(DType dtype) {
  switch (dtype) {
    case DType::Float32: return 4;
    case DType::Float64: return 8;
    case DType::Float16: return 2;
    case DType::BFloat16: return 2;
    case DType::Int64: return 8;
  }
  return 0;
}

inline const char* dtype_name(int code) {
  switch (code) {
    case 0: return "float32";
    case 1: return "float64";
    case 2: return "float16";
    case 3: return "bfloat16";
    case 4: return "int64";
    default: return "unknown";
  }
}

// A strided 2-D view of caller memory: element (r, c) lives at
// data + r * stride_row + c * stride_col (strides in elements, may be 0 for
// broadcast inputs). `data == 0` means "absent" for optional outputs.
struct MatrixRef {
  std::uintptr_t data = 0;
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  std::int64_t stride_row = 0;
  std::int64_t stride_col = 0;
  int dtype = -1;  // a DType code
};

// A strided 1-D view (status counters, a bias vector).
struct VectorRef {
  std::uintptr_t data = 0;
  std::int64_t size = 0;
  std::int64_t stride = 0;
  int dtype = -1;
};

// A strided 3-D view [n, t, d] of caller memory (strides in elements).
struct Tensor3Ref {
  std::uintptr_t data = 0;
  std::int64_t n = 0, t = 0, d = 0;
  std::int64_t stride_n = 0, stride_t = 0, stride_d = 0;
  int dtype = -1;
};

// Running per-query top-k state (influence_block and topk_merge), each array contiguous [n_query, k].
// Slots not yet filled hold index -1 and sort after every real entry.
struct TopKRef {
  MatrixRef largest_values;    // [n_query, k] accumulation dtype, sorted best first
  MatrixRef largest_indices;   // [n_query, k] int64
  MatrixRef smallest_values;   // [n_query, k] accumulation dtype
  MatrixRef smallest_indices;  // [n_query, k] int64
  TORCHFLUENCE_HOST_DEVICE std::int64_t k() const { return largest_values.cols; }
};

inline void check(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

// Whether the kernels may address `m` with implied row-major strides (torch's is_contiguous).
inline bool is_dense(const MatrixRef& m) {
  return (m.rows <= 1 || m.stride_row == m.cols) && (m.cols <= 1 || m.stride_col == 1);
}

inline bool is_dense(const VectorRef& v) { return v.size <= 1 || v.stride == 1; }

inline bool is_dense(const Tensor3Ref& t) {
  return (t.n <= 1 || t.stride_n == t.t * t.d) && (t.t <= 1 || t.stride_t == t.d) && (t.d <= 1 || t.stride_d == 1);
}

// Whether no two elements of an output share memory (so accumulating into it is well defined).
// Sufficient, not necessary: one dimension's stride must step over the whole other one.
inline bool is_non_overlapping(const MatrixRef& m) {
  if (m.rows == 0 || m.cols == 0) return true;
  if (m.stride_row < 0 || m.stride_col < 0) return false;
  if (m.rows == 1 || m.cols == 1) return (m.rows <= 1 || m.stride_row > 0) && (m.cols <= 1 || m.stride_col > 0);
  const bool col_inner = m.stride_col <= m.stride_row;
  const std::int64_t inner = col_inner ? m.stride_col : m.stride_row;
  const std::int64_t inner_n = col_inner ? m.cols : m.rows;
  const std::int64_t outer = col_inner ? m.stride_row : m.stride_col;
  return inner > 0 && outer / inner_n >= inner;
}

// offset + count stays within int64.
inline bool fits_int64(std::int64_t offset, std::int64_t count) {
  return offset >= 0 && count >= 0 && offset <= std::numeric_limits<std::int64_t>::max() - count;
}

}  // namespace torchfluence
