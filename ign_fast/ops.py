"""Python entry of every ign_fast op: input checks, backend choice, fake kernels and autograd.

Each op is defined once in csrc/ops.cpp (TORCH_LIBRARY(ign_fast, ...)) with a kernel per backend:
csrc/cpu/<op>.cpp, csrc/cuda/<op>.cu, and a Triton kernel in ign_fast.kernels where it pays. The fake
kernels below let torch.compile and torch.export trace the ops; the autograd formulas call only registered
ops, so backward traces too. Where the extension is missing every function here runs ign_fast.reference.
"""
import torch

from . import reference
from ._extension import CUDA_BUILT, HAS_C
from .validation import check_distance_kind, check_nonempty_rows, check_same, check_tensor

BACKENDS = ("auto", "native", "triton", "torch")
_backend = "auto"


def set_backend(name):
    """Choose the kernels: "auto" (the fastest available), "native" (C++/CUDA), "triton", or "torch"
    (the plain PyTorch reference)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _backend = name


def get_backend():
    return _backend


def native_available(t):
    """Whether a compiled kernel exists for t's device."""
    if not HAS_C or _backend == "torch":
        return False
    return t.device.type == "cpu" or (t.device.type == "cuda" and CUDA_BUILT)


# ---------------------------------------------------------------------------------------------------------
# per_sample_distance

def per_sample_distance(a, b, kind="l1"):
    """d(a, b)_i = mean over non-batch dims of |a-b| ("l1") or (a-b)^2 ("l2"); a [B] tensor in float32
    (float64 for float64 inputs), accumulated in float32 or wider. Differentiable in a and b."""
    check_tensor("a", a)
    check_same("b", b, "a", a)
    check_distance_kind("kind", kind)
    check_nonempty_rows("a", a)
    if native_available(a):
        return torch.ops.ign_fast.per_sample_distance(a, b, kind)
    return reference.per_sample_distance(a, b, kind)


if HAS_C:

    @torch.library.register_fake("ign_fast::per_sample_distance")
    def _per_sample_distance_fake(a, b, kind):
        return a.new_empty((a.shape[0],), dtype=reference.accumulate_dtype(a.dtype))

    @torch.library.register_fake("ign_fast::per_sample_distance_backward")
    def _per_sample_distance_backward_fake(grad, a, b, kind):
        return torch.empty_like(a, memory_format=torch.contiguous_format), torch.empty_like(
            a, memory_format=torch.contiguous_format)

    def _per_sample_distance_setup(ctx, inputs, output):
        a, b, kind = inputs
        ctx.save_for_backward(a, b)
        ctx.kind = kind

    def _per_sample_distance_backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad_a, grad_b = torch.ops.ign_fast.per_sample_distance_backward(grad, a, b, ctx.kind)
        return grad_a, grad_b, None

    torch.library.register_autograd("ign_fast::per_sample_distance", _per_sample_distance_backward,
                                    setup_context=_per_sample_distance_setup)


# ---------------------------------------------------------------------------------------------------------
# nearest_neighbors

def nearest_neighbors(queries, candidates, metric="l2"):
    """(index [B] int64, distance [B]) of each query's nearest candidate, distance as per_sample_distance."""
    check_tensor("queries", queries)
    check_tensor("candidates", candidates)
    check_distance_kind("metric", metric)
    if queries[0].numel() != candidates[0].numel() if len(candidates) and len(queries) else False:
        raise ValueError(f"candidates must have the per-sample size of queries ({queries[0].numel()}), "
                         f"got {candidates[0].numel()}")
    if candidates.shape[0] == 0:
        raise ValueError("candidates must hold at least one row")
    return reference.nearest_neighbors(queries, candidates, metric)
