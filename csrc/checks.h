// Input checks shared by the kernels: what a Python caller can get wrong gets a TORCH_CHECK naming the argument.
#pragma once
#include <ATen/ATen.h>
#include <string>

namespace ign_fast {

enum class DistanceKind { L1, L2 };

inline DistanceKind parse_distance_kind(const std::string& kind) {
  if (kind == "l1") return DistanceKind::L1;
  if (kind == "l2") return DistanceKind::L2;
  TORCH_CHECK(false, "ign_fast: kind must be 'l1' or 'l2', got '", kind, "'");
}

// a and b: same shape, dtype and device, at least one dim (the batch), and a non-empty row.
inline void check_pair(const at::Tensor& a, const at::Tensor& b, const char* a_name, const char* b_name) {
  TORCH_CHECK(a.dim() >= 1, "ign_fast: ", a_name, " must have a batch dimension, got a 0-dim tensor");
  TORCH_CHECK(a.sizes() == b.sizes(), "ign_fast: ", b_name, " must have the shape of ", a_name, " ", a.sizes(),
              ", got ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "ign_fast: ", b_name, " must have the dtype of ", a_name, " (",
              a.scalar_type(), "), got ", b.scalar_type());
  TORCH_CHECK(a.device() == b.device(), "ign_fast: ", b_name, " must be on the device of ", a_name, " (",
              a.device(), "), got ", b.device());
  TORCH_CHECK(at::isFloatingType(a.scalar_type()), "ign_fast: ", a_name,
              " must be float64, float32, bfloat16 or float16, got ", a.scalar_type());
  TORCH_CHECK(a.size(0) == 0 || a.numel() / a.size(0) > 0, "ign_fast: ", a_name,
              " must have at least one element per sample, got shape ", a.sizes());
}

// grad: one upstream value per sample of a, on a's device (the backward of a per-sample reduction).
inline void check_per_sample_grad(const at::Tensor& grad, const at::Tensor& a) {
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == a.size(0), "ign_fast: grad must have shape [", a.size(0),
              "], got ", grad.sizes());
  TORCH_CHECK(grad.device() == a.device(), "ign_fast: grad must be on ", a.device(), ", got ", grad.device());
}

// Result dtype of a per-sample reduction: float64 stays float64, everything else accumulates into float32.
inline at::ScalarType accumulate_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace ign_fast
