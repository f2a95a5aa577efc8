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
  // The IGN objective in one pass (ign_fast/objectives.py, contract in ign_fast/ops.py): total (0-dim) and the
  // per-sample rec, idem, tight, plus tight before the clamp, which the backward needs with rec.
  m.def("ign_loss(Tensor x, Tensor fx, Tensor fz, Tensor f_fz, Tensor ff_z, str kind, float lambda_rec, "
        "float lambda_idem, float lambda_tight, float? tight_clamp_ratio) -> (Tensor total, Tensor rec, "
        "Tensor idem, Tensor tight, Tensor tight_unclamped)");
  // Gradients w.r.t. x (an empty [0] tensor unless compute_grad_x), fx, fz, f_fz and ff_z in one pass. A missing
  // per-sample upstream gradient is zero (only total was used).
  m.def("ign_loss_backward(Tensor grad_total, Tensor? grad_rec, Tensor? grad_idem, Tensor? grad_tight, Tensor x, "
        "Tensor fx, Tensor fz, Tensor f_fz, Tensor ff_z, Tensor rec, Tensor tight_unclamped, str kind, "
        "float lambda_rec, float lambda_idem, float lambda_tight, float? tight_clamp_ratio, bool compute_grad_x) "
        "-> (Tensor grad_x, Tensor grad_fx, Tensor grad_fz, Tensor grad_f_fz, Tensor grad_ff_z)");
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
