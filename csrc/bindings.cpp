// The compiled module torchfluence._C: raw-pointer kernels and build facts.
//
// Argument validation (dtype, shape, device, finiteness policy) happens in
// python/torchfluence/_ops.py before anything here is called; this layer only
// repeats the checks whose failure would corrupt memory.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "common.h"
#include "cpu/influence_block.h"
#include "cpu/linear_head.h"
#include "cpu/psg_dot.h"
#ifdef TORCHFLUENCE_WITH_CUDA
#include "cuda/influence_block_cuda.h"
#include "cuda/linear_head_cuda.h"
#include "cuda/psg_dot_cuda.h"
#endif

namespace py = pybind11;
using namespace torchfluence;

namespace {

void check_block_args(const InfluenceBlockArgs& a, const char* where) {
  const std::string w(where);
  check(a.queries.cols == a.train.cols, w + ": S and G must have the same number of columns, got " +
                                            std::to_string(a.queries.cols) + " and " + std::to_string(a.train.cols));
  check(a.topk.k >= 0, w + ": k must be >= 0, got " + std::to_string(a.topk.k));
  check(a.topk.k == 0 || (a.topk.largest_values && a.topk.largest_indices && a.topk.smallest_values &&
                          a.topk.smallest_indices),
        w + ": top-k state pointers are missing");
  check(a.topk.k > 0 || a.scores.data, w + ": nothing to compute (no scores output and k == 0)");
  check(!a.scores.data || (a.scores.rows == a.queries.rows && a.scores.cols == a.train.rows),
        w + ": scores must have shape [n_query, b]");
  check(a.status != 0, w + ": status pointer is missing");
  check(a.offset >= 0, w + ": offset must be >= 0, got " + std::to_string(a.offset));
}

void check_psg_args(const PsgDotArgs& a, const char* where) {
  const std::string w(where);
  const auto& A = a.activations;
  const auto& D = a.output_grads;
  check(A.n == D.n && A.t == D.t, w + ": activations [b, T, d_in] and output_grads [b, T, d_out] must agree in b and T");
  check(a.queries.cols == A.d * D.d, w + ": queries must have d_out * d_in = " + std::to_string(A.d * D.d) +
                                         " columns, got " + std::to_string(a.queries.cols));
  check(a.scores.data && a.scores.rows == a.queries.rows && a.scores.cols == A.n,
        w + ": scores must have shape [n_query, b]");
}

void check_head_args(const LinearHeadArgs& a, const char* where) {
  const std::string w(where);
  check(a.features.cols == a.weight.cols, w + ": features [n, d] and weight [C, d] must agree in d");
  check(a.vectors != 0 && a.out != 0, w + ": vectors and out are required");
  check(a.k >= 0 && a.n_total > 0, w + ": k must be >= 0 and n_total > 0");
  check(static_cast<int>(a.loss) >= 0 && static_cast<int>(a.loss) <= 2, w + ": loss code must be 0, 1 or 2");
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
  m.doc() = "torchfluence compiled kernels (raw pointers; use torchfluence._ops)";

  py::class_<MatrixRef>(m, "MatrixRef")
      .def(py::init([](std::uintptr_t data, std::int64_t rows, std::int64_t cols, std::int64_t stride_row,
                       std::int64_t stride_col) { return MatrixRef{data, rows, cols, stride_row, stride_col}; }),
           py::arg("data"), py::arg("rows"), py::arg("cols"), py::arg("stride_row"), py::arg("stride_col"))
      .def(py::init<>());

  py::class_<TopKRef>(m, "TopKRef")
      .def(py::init([](std::int64_t k, std::uintptr_t lv, std::uintptr_t li, std::uintptr_t sv, std::uintptr_t si) {
             return TopKRef{k, lv, li, sv, si};
           }),
           py::arg("k"), py::arg("largest_values"), py::arg("largest_indices"), py::arg("smallest_values"),
           py::arg("smallest_indices"))
      .def(py::init<>());

  py::class_<InfluenceBlockArgs>(m, "InfluenceBlockArgs")
      .def(py::init([](int dtype, MatrixRef queries, MatrixRef train, std::int64_t offset, MatrixRef scores,
                       TopKRef topk, std::uintptr_t status) {
             check(dtype >= 0 && dtype <= 3, "dtype code must be in [0, 3], got " + std::to_string(dtype));
             return InfluenceBlockArgs{static_cast<DType>(dtype), queries, train, offset, scores, topk, status};
           }),
           py::arg("dtype"), py::arg("queries"), py::arg("train"), py::arg("offset"), py::arg("scores"),
           py::arg("topk"), py::arg("status"));

  m.def(
      "influence_block_cpu",
      [](const InfluenceBlockArgs& args) {
        check_block_args(args, "influence_block (CPU)");
        py::gil_scoped_release release;
        cpu::influence_block(args);
      },
      py::arg("args"));

  py::class_<Tensor3Ref>(m, "Tensor3Ref")
      .def(py::init([](std::uintptr_t data, std::int64_t n, std::int64_t t, std::int64_t d, std::int64_t sn,
                       std::int64_t st, std::int64_t sd) { return Tensor3Ref{data, n, t, d, sn, st, sd}; }),
           py::arg("data"), py::arg("n"), py::arg("t"), py::arg("d"), py::arg("stride_n"), py::arg("stride_t"),
           py::arg("stride_d"));

  py::class_<PsgDotArgs>(m, "PsgDotArgs")
      .def(py::init([](int dtype, MatrixRef queries, Tensor3Ref activations, Tensor3Ref output_grads,
                       MatrixRef scores) {
             check(dtype >= 0 && dtype <= 3, "dtype code must be in [0, 3], got " + std::to_string(dtype));
             return PsgDotArgs{static_cast<DType>(dtype), queries, activations, output_grads, scores};
           }),
           py::arg("dtype"), py::arg("queries"), py::arg("activations"), py::arg("output_grads"), py::arg("scores"));

  py::class_<LinearHeadArgs>(m, "LinearHeadArgs")
      .def(py::init([](int dtype, int loss, MatrixRef features, MatrixRef weight, std::uintptr_t bias,
                       std::uintptr_t vectors, std::uintptr_t out, std::int64_t k, std::int64_t n_total,
                       std::uintptr_t workspace) {
             check(dtype >= 0 && dtype <= 3, "dtype code must be in [0, 3], got " + std::to_string(dtype));
             return LinearHeadArgs{static_cast<DType>(dtype), static_cast<HeadLoss>(loss), features, weight, bias,
                                   vectors, out, k, n_total, workspace};
           }),
           py::arg("dtype"), py::arg("loss"), py::arg("features"), py::arg("weight"), py::arg("bias"),
           py::arg("vectors"), py::arg("out"), py::arg("k"), py::arg("n_total"), py::arg("workspace"));

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
      [](const InfluenceBlockArgs& args, std::uintptr_t workspace, int splits, std::uintptr_t stream) {
        check_block_args(args, "influence_block (CUDA)");
        check(args.topk.k == 0 || workspace != 0, "influence_block (CUDA): workspace is missing");
        py::gil_scoped_release release;
        cuda::influence_block(args, workspace, splits, stream);
      },
      py::arg("args"), py::arg("workspace"), py::arg("splits"), py::arg("stream"));
  m.def(
      "psg_dot_cuda",
      [](const PsgDotArgs& args, std::uintptr_t stream) {
        check_psg_args(args, "psg_dot (CUDA)");
        py::gil_scoped_release release;
        cuda::psg_dot(args, stream);
      },
      py::arg("args"), py::arg("stream"));
  m.def(
      "linear_head_hvp_cuda",
      [](const LinearHeadArgs& args, std::uintptr_t stream) {
        check_head_args(args, "linear_head_hvp (CUDA)");
        check(args.workspace != 0, "linear_head_hvp (CUDA): workspace is missing");
        py::gil_scoped_release release;
        cuda::linear_head_hvp(args, stream);
      },
      py::arg("args"), py::arg("stream"));
#endif

  m.def("build_info", &build_info);
}
