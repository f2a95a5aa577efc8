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
    """For each query row, the index and distance of its nearest candidate row (the IMLE search).

    queries [B, *] and candidates [M, *] are flattened to [B, D] and [M, D]. The distance is the one
    per_sample_distance reports, the MEAN over D of |q - c| ("l1") or (q - c)^2 ("l2", squared: the mean
    squared error, torch.cdist(q, c) ** 2 / D), accumulated in float32 (float64 for float64 inputs) from
    direct differences. Returns (index [B] int64, distance [B] float32, float64 for float64 inputs); ties go to
    the lowest index and a NaN distance counts as +inf. The B x M distance matrix is never stored. Not
    differentiable (the index is discrete): recompute the winning distance with per_sample_distance to train
    through it."""
    check_tensor("queries", queries)
    check_tensor("candidates", candidates)
    if metric not in ("l1", "l2"):
        raise ValueError(f"metric must be 'l1' or 'l2', got {metric!r}")
    if candidates.dtype != queries.dtype:
        raise TypeError(f"candidates must have the dtype of queries ({queries.dtype}), got {candidates.dtype}")
    if candidates.device != queries.device:
        raise ValueError(f"candidates must be on the device of queries ({queries.device}), got {candidates.device}")
    width = queries.shape[1:].numel()
    if width == 0:
        raise ValueError(f"queries must have at least one element per row, got shape {tuple(queries.shape)}")
    if candidates.shape[0] == 0:
        raise ValueError(f"candidates must have at least one row, got shape {tuple(candidates.shape)}")
    if candidates.shape[1:].numel() != width:
        raise ValueError(f"candidates rows must have D = {width} elements like queries {tuple(queries.shape)}, "
                         f"got shape {tuple(candidates.shape)}")
    q = queries.reshape(queries.shape[0], width)
    c = candidates.reshape(candidates.shape[0], width)
    if _backend == "triton":
        from .kernels.nearest_neighbors import nearest_neighbors_triton

        return nearest_neighbors_triton(q, c, metric)
    # the CUDA kernel packs (float32 distance, index) into one 64-bit word: float64 on CUDA uses the reference
    if native_available(q) and not (q.is_cuda and q.dtype == torch.float64):
        return torch.ops.ign_fast.nearest_neighbors(q, c, metric)
    return reference.nearest_neighbors(q, c, metric)


if HAS_C:

    @torch.library.register_fake("ign_fast::nearest_neighbors")
    def _nearest_neighbors_fake(queries, candidates, metric):
        torch._check(queries.dim() == 2 and candidates.dim() == 2, lambda: "queries and candidates must be 2-D")
        torch._check(queries.shape[1] == candidates.shape[1], lambda: "queries and candidates must share D")
        batch = queries.shape[0]
        return (queries.new_empty((batch,), dtype=torch.int64),
                queries.new_empty((batch,), dtype=reference.accumulate_dtype(queries.dtype)))
