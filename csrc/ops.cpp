// Schemas of every ign_fast op, and the pybind11 module ign_fast._C that reports build facts.
// Each op is defined once here; csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu register one kernel per backend
// under the same name, and ign_fast/ops.py adds the fake kernel and autograd.
#include <Python.h>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <pybind11/pybind11.h>

TORCH_LIBRARY(ign_fast, m) {
  // mean over non-batch dims of |a-b| (kind="l1") or (a-b)^2 (kind="l2"); float32 (float64 for float64 input)
  m.def("per_sample_distance(Tensor a, Tensor b, str kind) -> Tensor");
  m.def("per_sample_distance_backward(Tensor grad, Tensor a, Tensor b, str kind) -> (Tensor, Tensor)");
  // for each row of queries [B, D], the lowest index of its nearest row of candidates [M, D] and that
  // distance, the per_sample_distance of the pair (mean over D of |q-c| or (q-c)^2); no B x M matrix
  m.def("nearest_neighbors(Tensor queries, Tensor candidates, str metric) -> (Tensor index, Tensor distance)");
}

namespace {
bool cuda_built() {
#ifdef IGN_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(_C, module) {
  module.doc() = "ign_fast compiled ops (registered as torch.ops.ign_fast.*) and build facts";
  module.def("cuda_built", &cuda_built, "whether the CUDA kernels were compiled into this build");
  module.attr("torch_version") = IGN_FAST_TORCH_VERSION;
#ifdef IGN_FAST_WITH_CUDA
  module.attr("cuda_version") = IGN_FAST_CUDA_VERSION;
#else
  module.attr("cuda_version") = pybind11::none();
#endif
}
