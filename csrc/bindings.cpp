// The compiled module torchfluence._C: raw-pointer kernels and build facts.
//
// Argument validation (types, dtypes, shapes, devices, finiteness policy)
// happens in python/torchfluence/ops/ before anything here is called. This
// layer repeats every check whose failure would make a kernel write out of
// bounds: the shape, element type and layout of each array a kernel writes,
// the sizes it indexes with, and the launch bounds of the CUDA grids.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <string>

#include "common.h"
#include "influence_block_args.h"
#include "linear_head_args.h"
#include "psg_dot_args.h"
#include "sjlt_args.h"
#include "topk_merge_args.h"

#include "cpu/influence_block.h"
#include "cpu/linear_head.h"
#include "cpu/psg_dot.h"
#include "cpu/sjlt.h"
#include "cpu/topk_merge.h"
#ifdef TORCHFLUENCE_WITH_CUDA
#include "cuda/influence_block_cuda.h"
#include "cuda/linear_head_cuda.h"
#include "cuda/psg_dot_cuda.h"
#include "cuda/sjlt_cuda.h"
#include "cuda/topk_merge_cuda.h"
#endif

namespace py = pybind11;
using namespace torchfluence;

namespace {

std::string shape_str(std::int64_t a, std::int64_t b) {
  return "(" + std::to_string(a) + ", " + std::to_string(b) + ")";
}

std::string describe(const MatrixRef& m) {
  return shape_str(m.rows, m.cols) + " " + dtype_name(m.dtype) + " with strides " +
         shape_str(m.stride_row, m.stride_col);
}

std::string describe(const Tensor3Ref& t) {
  return "(" + std::to_string(t.n) + ", " + std::to_string(t.t) + ", " + std::to_string(t.d) + ") " +
         dtype_name(t.dtype) + " with strides (" + std::to_string(t.stride_n) + ", " + std::to_string(t.stride_t) +
         ", " + std::to_string(t.stride_d) + ")";
}

// An input the kernel only reads, with any non-negative strides.
void check_input(const MatrixRef& m, const std::string& w, const char* name, int dtype) {
  check(m.rows >= 0 && m.cols >= 0 && m.stride_row >= 0 && m.stride_col >= 0 && m.dtype == dtype &&
            (m.data != 0 || m.rows == 0 || m.cols == 0),
        w + ": " + name + " must be a " + dtype_name(dtype) + " matrix with non-negative sizes and strides, got " +
            describe(m));
}

void check_input(const Tensor3Ref& t, const std::string& w, const char* name, int dtype) {
  check(t.n >= 0 && t.t >= 0 && t.d >= 0 && t.stride_n >= 0 && t.stride_t >= 0 && t.stride_d >= 0 &&
            t.dtype == dtype && (t.data != 0 || t.n == 0 || t.t == 0 || t.d == 0),
        w + ": " + name + " must be a " + dtype_name(dtype) + " array with non-negative sizes and strides, got " +
            describe(t));
}

// An array the kernel writes with implied row-major strides.
void check_dense(const MatrixRef& m, const std::string& w, const char* name, std::int64_t rows, std::int64_t cols,
                 DType dtype) {
  const int code = static_cast<int>(dtype);
  check(m.rows == rows && m.cols == cols && m.dtype == code && is_dense(m) && (m.data != 0 || rows * cols == 0),
        w + ": " + name + " must be a contiguous " + shape_str(rows, cols) + " " + dtype_name(code) + " array, got " +
            describe(m));
}

void check_dense(const Tensor3Ref& t, const std::string& w, const char* name, std::int64_t n, std::int64_t len,
                 std::int64_t d, DType dtype) {
  const int code = static_cast<int>(dtype);
  check(t.n == n && t.t == len && t.d == d && t.dtype == code && is_dense(t) && (t.data != 0 || n * len * d == 0),
        w + ": " + name + " must be a contiguous (" + std::to_string(n) + ", " + std::to_string(len) + ", " +
            std::to_string(d) + ") " + dtype_name(code) + " array, got " + describe(t));
}

// A strided output the kernel writes element by element.
void check_output(const MatrixRef& m, const std::string& w, const char* name, std::int64_t rows, std::int64_t cols,
                  DType dtype) {
  const int code = static_cast<int>(dtype);
  check(m.rows == rows && m.cols == cols && m.dtype == code && is_non_overlapping(m) &&
            (m.data != 0 || rows * cols == 0),
        w + ": " + name + " must be a " + shape_str(rows, cols) + " " + dtype_name(code) +
            " array whose elements do not overlap, got " + describe(m));
}

void check_status(const VectorRef& s, const std::string& w) {
  check(s.data != 0 && s.size == 3 && is_dense(s) && s.dtype == static_cast<int>(DType::Int64),
        w + ": status must be a contiguous (3,) int64 array, got (" + std::to_string(s.size) + ",) " +
            dtype_name(s.dtype) + " with stride " + std::to_string(s.stride));
}

void check_topk(const TopKRef& t, const std::string& w, std::int64_t n_query, DType value_dtype) {
  const std::int64_t k = t.k();
  check(k >= 1, w + ": the top-k state must have k >= 1 columns, got " + std::to_string(k));
  check_dense(t.largest_values, w, "largest_values", n_query, k, value_dtype);
  check_dense(t.largest_indices, w, "largest_indices", n_query, k, DType::Int64);
  check_dense(t.smallest_values, w, "smallest_values", n_query, k, value_dtype);
  check_dense(t.smallest_indices, w, "smallest_indices", n_query, k, DType::Int64);
}

void check_offset(std::int64_t offset, std::int64_t count, const std::string& w) {
  check(fits_int64(offset, count), w + ": offset must be >= 0 and offset + " + std::to_string(count) +
                                       " must fit in int64, got offset " + std::to_string(offset));
}

void check_block_args(const InfluenceBlockArgs& a, const std::string& w) {
  const int code = static_cast<int>(a.dtype);
  check_input(a.queries, w, "S", code);
  check_input(a.train, w, "G", code);
  check(a.queries.cols == a.train.cols, w + ": S and G must have the same number of columns, got " +
                                            std::to_string(a.queries.cols) + " and " + std::to_string(a.train.cols));
  const std::int64_t n_query = a.queries.rows, b = a.train.rows;
  const DType acc = accumulation_dtype(a.dtype);
  check_topk(a.topk, w, n_query, acc);
  check_status(a.status, w);
  if (a.scores.data != 0) check_output(a.scores, w, "scores", n_query, b, acc);
  check_offset(a.offset, b, w);
}

void check_merge_args(const TopKMergeArgs& a, const std::string& w) {
  const int code = a.scores.dtype;
  check(code == static_cast<int>(DType::Float32) || code == static_cast<int>(DType::Float64),
        w + ": scores must be float32 or float64, got " + dtype_name(code));
  check_input(a.scores, w, "scores", code);
  check_topk(a.topk, w, a.scores.rows, static_cast<DType>(code));
  check_status(a.status, w);
  check_offset(a.offset, a.scores.cols, w);
}

void check_psg_args(const PsgDotArgs& a, const std::string& w) {
  const int code = static_cast<int>(a.dtype);
  const auto& A = a.activations;
  const auto& D = a.output_grads;
  check_input(a.queries, w, "Q", code);
  check_input(A, w, "A", code);
  check_input(D, w, "D", code);
  check(A.n == D.n && A.t == D.t,
        w + ": activations [b, T, d_in] and output_grads [b, T, d_out] must agree in b and T");
  const bool cols_match = A.d == 0 ? a.queries.cols == 0 : (a.queries.cols % A.d == 0 && a.queries.cols / A.d == D.d);
  check(cols_match, w + ": Q must have d_out * d_in = " + std::to_string(D.d) + " * " + std::to_string(A.d) +
                        " columns, got " + std::to_string(a.queries.cols));
  check_output(a.scores, w, "scores", a.queries.rows, A.n, accumulation_dtype(a.dtype));
}

void check_head_args(const LinearHeadArgs& a, const std::string& w) {
  const int code = static_cast<int>(a.dtype);
  check(a.dtype == DType::Float32 || a.dtype == DType::Float64, w + ": dtype must be float32 or float64");
  check_input(a.features, w, "features", code);
  check_input(a.weight, w, "weight", code);
  check(a.features.cols == a.weight.cols, w + ": features [n, d] and weight [C, d] must agree in d, got " +
                                              std::to_string(a.features.cols) + " and " +
                                              std::to_string(a.weight.cols));
  const std::int64_t C = a.weight.rows, d1 = a.features.cols + (a.has_bias() ? 1 : 0), k = a.k();
  if (a.has_bias())
    check(a.bias.size == C && is_dense(a.bias) && a.bias.dtype == code,
          w + ": bias must be a contiguous (" + std::to_string(C) + ",) " + dtype_name(code) + " array, got (" +
              std::to_string(a.bias.size) + ",) " + dtype_name(a.bias.dtype) + " with stride " +
              std::to_string(a.bias.stride));
  check(k >= 0, w + ": vectors must have k >= 0 rows, got " + std::to_string(k));
  check_dense(a.vectors, w, "vectors", k, C, d1, a.dtype);
  check_dense(a.out, w, "out", k, C, d1, a.dtype);
  check(a.n_total > 0, w + ": n_total must be > 0, got " + std::to_string(a.n_total));
  check(static_cast<int>(a.loss) >= 0 && static_cast<int>(a.loss) <= 2, w + ": loss code must be 0, 1 or 2");
}

void check_sjlt_args(const SjltArgs& a, const std::string& w) {
  const int code = static_cast<int>(a.dtype);
  check_input(a.input, w, "G", code);
  const std::int64_t k = a.out.cols;
  check(k >= 1 && k <= kSjltMaxK,
        w + ": out must have 1 <= k <= " + std::to_string(kSjltMaxK) + " columns, got " + std::to_string(k));
  check(a.s >= 1 && a.s <= std::min(k, kSjltMaxS), w + ": s must be in [1, min(k, " + std::to_string(kSjltMaxS) +
                                                       ")] = [1, " + std::to_string(std::min(k, kSjltMaxS)) +
                                                       "], got " + std::to_string(a.s));
  check_output(a.out, w, "out", a.input.rows, k, accumulation_dtype(a.dtype));
  check_offset(a.offset, a.input.cols, w);
}

int checked_dtype(int dtype) {
  check(is_input_dtype(dtype), "dtype code must be in [0, 3], got " + std::to_string(dtype));
  return dtype;
}

py::dict build_info() {
  py::dict info;
  info["version"] = TORCHFLUENCE_VERSION;
  info["openmp_threads"] = cpu::max_threads();
#ifdef TORCHFLUENCE_WITH_CUDA
  info["cuda"] = true;
  info["cuda_version"] = cuda::runtime_version();
  info["cuda_architectures"] = std::string(TORCHFLUENCE_CUDA_ARCHITECTURES);
  info["max_fused_topk"] = cuda::kMaxFusedTopK;
#else
  info["cuda"] = false;
  info["cuda_version"] = py::none();
  info["cuda_architectures"] = py::none();
  info["max_fused_topk"] = py::none();
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "torchfluence compiled kernels (raw pointers; use torchfluence.ops)";

  py::class_<MatrixRef>(m, "MatrixRef")
      .def(py::init([](std::uintptr_t data, std::int64_t rows, std::int64_t cols, std::int64_t stride_row,
                       std::int64_t stride_col, int dtype) {
             return MatrixRef{data, rows, cols, stride_row, stride_col, dtype};
           }),
           py::arg("data"), py::arg("rows"), py::arg("cols"), py::arg("stride_row"), py::arg("stride_col"),
           py::arg("dtype"))
      .def(py::init<>());

  py::class_<VectorRef>(m, "VectorRef")
      .def(py::init([](std::uintptr_t data, std::int64_t size, std::int64_t stride, int dtype) {
             return VectorRef{data, size, stride, dtype};
           }),
           py::arg("data"), py::arg("size"), py::arg("stride"), py::arg("dtype"))
      .def(py::init<>());

  py::class_<Tensor3Ref>(m, "Tensor3Ref")
      .def(py::init([](std::uintptr_t data, std::int64_t n, std::int64_t t, std::int64_t d, std::int64_t sn,
                       std::int64_t st, std::int64_t sd, int dtype) {
             return Tensor3Ref{data, n, t, d, sn, st, sd, dtype};
           }),
           py::arg("data"), py::arg("n"), py::arg("t"), py::arg("d"), py::arg("stride_n"), py::arg("stride_t"),
           py::arg("stride_d"), py::arg("dtype"));

  py::class_<TopKRef>(m, "TopKRef")
      .def(py::init([](MatrixRef lv, MatrixRef li, MatrixRef sv, MatrixRef si) { return TopKRef{lv, li, sv, si}; }),
           py::arg("largest_values"), py::arg("largest_indices"), py::arg("smallest_values"),
           py::arg("smallest_indices"));

  py::class_<InfluenceBlockArgs>(m, "InfluenceBlockArgs")
      .def(py::init([](int dtype, MatrixRef queries, MatrixRef train, std::int64_t offset, MatrixRef scores,
                       TopKRef topk, VectorRef status) {
             return InfluenceBlockArgs{static_cast<DType>(checked_dtype(dtype)), queries, train, offset, scores, topk,
                                       status};
           }),
           py::arg("dtype"), py::arg("queries"), py::arg("train"), py::arg("offset"), py::arg("scores"),
           py::arg("topk"), py::arg("status"));

  py::class_<TopKMergeArgs>(m, "TopKMergeArgs")
      .def(py::init([](MatrixRef scores, std::int64_t offset, TopKRef topk, VectorRef status) {
             return TopKMergeArgs{scores, offset, topk, status};
           }),
           py::arg("scores"), py::arg("offset"), py::arg("topk"), py::arg("status"));

  py::class_<PsgDotArgs>(m, "PsgDotArgs")
      .def(py::init([](int dtype, MatrixRef queries, Tensor3Ref activations, Tensor3Ref output_grads,
                       MatrixRef scores) {
             return PsgDotArgs{static_cast<DType>(checked_dtype(dtype)), queries, activations, output_grads, scores};
           }),
           py::arg("dtype"), py::arg("queries"), py::arg("activations"), py::arg("output_grads"), py::arg("scores"));

  py::class_<LinearHeadArgs>(m, "LinearHeadArgs")
      .def(py::init([](int dtype, int loss, MatrixRef features, MatrixRef weight, VectorRef bias, Tensor3Ref vectors,
                       Tensor3Ref out, std::int64_t n_total, std::uintptr_t workspace, std::int64_t workspace_bytes) {
             check(loss >= 0 && loss <= 2, "loss code must be 0, 1 or 2, got " + std::to_string(loss));
             return LinearHeadArgs{static_cast<DType>(checked_dtype(dtype)), static_cast<HeadLoss>(loss), features,
                                   weight, bias, vectors, out, n_total, workspace, workspace_bytes};
           }),
           py::arg("dtype"), py::arg("loss"), py::arg("features"), py::arg("weight"), py::arg("bias"),
           py::arg("vectors"), py::arg("out"), py::arg("n_total"), py::arg("workspace"), py::arg("workspace_bytes"));

  py::class_<SjltArgs>(m, "SjltArgs")
      .def(py::init([](int dtype, MatrixRef input, std::int64_t offset, std::int64_t s, std::uint64_t seed,
                       MatrixRef out) {
             return SjltArgs{static_cast<DType>(checked_dtype(dtype)), input, offset, s, seed, out};
           }),
           py::arg("dtype"), py::arg("input"), py::arg("offset"), py::arg("s"), py::arg("seed"), py::arg("out"));

  m.def(
      "sjlt_cpu",
      [](const SjltArgs& args) {
        check(args.dtype == DType::Float32 || args.dtype == DType::Float64,
              "sjlt (CPU): dtype must be float32 or float64");
        check_sjlt_args(args, "sjlt (CPU)");
        py::gil_scoped_release release;
        cpu::sjlt(args);
      },
      py::arg("args"));

  m.def(
      "influence_block_cpu",
      [](const InfluenceBlockArgs& args) {
        check(args.dtype == DType::Float32 || args.dtype == DType::Float64,
              "influence_block (CPU): dtype must be float32 or float64");
        check_block_args(args, "influence_block (CPU)");
        py::gil_scoped_release release;
        cpu::influence_block(args);
      },
      py::arg("args"));

  m.def(
      "topk_merge_cpu",
      [](const TopKMergeArgs& args) {
        check_merge_args(args, "topk_merge (CPU)");
        py::gil_scoped_release release;
        cpu::topk_merge(args);
      },
      py::arg("args"));

  m.def(
      "linear_head_hvp_cpu",
      [](const LinearHeadArgs& args) {
        check_head_args(args, "linear_head_hvp (CPU)");
        py::gil_scoped_release release;
        cpu::linear_head_hvp(args);
      },
      py::arg("args"));

  m.def(
      "psg_dot_cpu",
      [](const PsgDotArgs& args) {
        check(args.dtype == DType::Float32 || args.dtype == DType::Float64,
              "psg_dot (CPU): dtype must be float32 or float64");
        check_psg_args(args, "psg_dot (CPU)");
        py::gil_scoped_release release;
        cpu::psg_dot(args);
      },
      py::arg("args"));

#ifdef TORCHFLUENCE_WITH_CUDA
  m.def("influence_block_cuda_splits", &cuda::influence_block_splits, py::arg("n_query"), py::arg("b"),
        py::arg("k"), py::arg("num_sms"));
  m.def(
      "influence_block_cuda",
      [](const InfluenceBlockArgs& args, std::uintptr_t workspace, std::int64_t workspace_bytes, int splits,
         std::uintptr_t stream) {
        const std::string w = "influence_block (CUDA)";
        check_block_args(args, w);
        check(splits >= 1 && splits <= 65535, w + ": splits must be in [1, 65535], got " + std::to_string(splits));
        const std::int64_t need = cuda::influence_block_workspace_bytes(
            args.queries.rows, args.topk.k(), splits, element_size(accumulation_dtype(args.dtype)));
        check((need == 0 || workspace != 0) && workspace_bytes >= need,
              w + ": workspace must hold " + std::to_string(need) + " bytes, got " + std::to_string(workspace_bytes));
        py::gil_scoped_release release;
        cuda::influence_block(args, workspace, splits, stream);
      },
      py::arg("args"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("splits"), py::arg("stream"));
  m.def(
      "topk_merge_cuda",
      [](const TopKMergeArgs& args, std::uintptr_t workspace, std::int64_t workspace_bytes, std::uintptr_t stream) {
        const std::string w = "topk_merge (CUDA)";
        check_merge_args(args, w);
        check(workspace != 0 && workspace_bytes >= cuda::kTopKMergeWorkspaceBytes,
              w + ": workspace must hold " + std::to_string(cuda::kTopKMergeWorkspaceBytes) + " bytes, got " +
                  std::to_string(workspace_bytes));
        py::gil_scoped_release release;
        cuda::topk_merge(args, workspace, stream);
      },
      py::arg("args"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"));
  m.def(
      "psg_dot_cuda",
      [](const PsgDotArgs& args, std::uintptr_t stream) {
        check_psg_args(args, "psg_dot (CUDA)");
        py::gil_scoped_release release;
        cuda::psg_dot(args, stream);
      },
      py::arg("args"), py::arg("stream"));
  m.def(
      "sjlt_cuda",
      [](const SjltArgs& args, std::uintptr_t stream) {
        check_sjlt_args(args, "sjlt (CUDA)");
        py::gil_scoped_release release;
        cuda::sjlt(args, stream);
      },
      py::arg("args"), py::arg("stream"));
  m.def(
      "linear_head_hvp_cuda",
      [](const LinearHeadArgs& args, std::uintptr_t stream) {
        const std::string w = "linear_head_hvp (CUDA)";
        check_head_args(args, w);
        const std::int64_t n = args.features.rows, C = args.weight.rows;
        const std::int64_t need = n * C * (args.k() + 1) * element_size(args.dtype);
        check((need == 0 || args.workspace != 0) && args.workspace_bytes >= need,
              w + ": workspace must hold " + std::to_string(need) + " bytes, got " +
                  std::to_string(args.workspace_bytes));
        py::gil_scoped_release release;
        cuda::linear_head_hvp(args, stream);
      },
      py::arg("args"), py::arg("stream"));
  m.def("influence_block_shared_bytes", &cuda::influence_block_shared_bytes, py::arg("k"), py::arg("acc_bytes"));
  m.def("cuda_limits", []() {
    py::dict limits;
    limits["influence_block_max_query_rows"] = cuda::kMaxQueryRows;
    limits["influence_block_max_train_rows"] = cuda::kMaxTrainRows;
    limits["psg_dot_max_query_rows"] = cuda::kPsgDotMaxQueryRows;
    limits["psg_dot_max_samples"] = cuda::kPsgDotMaxSamples;
    limits["linear_head_max_vector_classes"] = cuda::kHeadMaxVectorClasses;
    limits["linear_head_max_vector_samples"] = cuda::kHeadMaxVectorSamples;
    limits["topk_merge_workspace_bytes"] = cuda::kTopKMergeWorkspaceBytes;
    return limits;
  });
#endif

  m.def("build_info", &build_info);
}
