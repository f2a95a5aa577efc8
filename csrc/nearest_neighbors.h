// Input checks of ign_fast::nearest_neighbors, shared by its CPU and CUDA kernels: callers of
// torch.ops.ign_fast.nearest_neighbors bypass the Python checks, so every user-reachable mistake gets a
// TORCH_CHECK that names the argument.
#pragma once
#include <ATen/ATen.h>

#include <string>

#include "checks.h"

namespace ign_fast {

inline DistanceKind check_nearest_neighbors_inputs(const at::Tensor& queries, const at::Tensor& candidates,
                                                   c10::string_view metric) {
  TORCH_CHECK(metric == "l1" || metric == "l2", "ign_fast: metric must be 'l1' or 'l2', got '",
              std::string(metric), "'");
  TORCH_CHECK(queries.dim() == 2, "ign_fast: queries must be 2-D [B, D], got shape ", queries.sizes());
  TORCH_CHECK(candidates.dim() == 2, "ign_fast: candidates must be 2-D [M, D], got shape ", candidates.sizes());
  TORCH_CHECK(queries.size(1) == candidates.size(1), "ign_fast: candidates must have the row length D = ",
              queries.size(1), " of queries, got ", candidates.size(1));
  TORCH_CHECK(queries.scalar_type() == candidates.scalar_type(), "ign_fast: candidates must have the dtype of ",
              "queries (", queries.scalar_type(), "), got ", candidates.scalar_type());
  TORCH_CHECK(at::isFloatingType(queries.scalar_type()),
              "ign_fast: queries must be float64, float32, bfloat16 or float16, got ", queries.scalar_type());
  TORCH_CHECK(queries.device() == candidates.device(), "ign_fast: candidates must be on the device of queries (",
              queries.device(), "), got ", candidates.device());
  TORCH_CHECK(candidates.size(0) >= 1, "ign_fast: candidates must have at least one row, got shape ",
              candidates.sizes());
  TORCH_CHECK(queries.size(1) >= 1, "ign_fast: queries must have at least one element per row, got shape ",
              queries.sizes());
  return metric == "l1" ? DistanceKind::L1 : DistanceKind::L2;
}

}  // namespace ign_fast
