"""Python entry of every ign_fast op: input checks, backend choice, fake kernels and autograd.

Each op is defined once in csrc/ops.cpp (TORCH_LIBRARY(ign_fast, ...)) with a kernel per backend:
csrc/cpu/<op>.cpp, csrc/cuda/<op>.cu, and a Triton kernel in ign_fast.kernels where it pays. The fake
kernels below let torch.compile and torch.export trace the ops; the autograd formulas call only registered
ops, so backward traces too. Where the extension is missing every function here runs ign_fast.reference.
"""
import os
from typing import Optional

import torch

from . import reference
from ._extension import CUDA_BUILT, HAS_C
from .validation import (check_clamp_ratio, check_distance_kind, check_nonempty_rows, check_nonnegative_float,
                         check_same, check_tensor)

BACKENDS = ("auto", "native", "triton", "torch")
# No CUDA or Triton kernel of ign_fast has run on a GPU yet (README, "What has run on a GPU"). Until the GPU
# check passes, "auto" runs CUDA tensors on the PyTorch reference and the GPU kernels are opt-in:
# set_backend("native") or "triton", or IGN_FAST_BACKEND=native. Set this to True in the commit that records
# the passing GPU run in benchmarks/RESULTS.md.
GPU_KERNELS_VERIFIED = False
_backend = os.environ.get("IGN_FAST_BACKEND", "auto") or "auto"
if _backend not in BACKENDS:
    raise ValueError(f"IGN_FAST_BACKEND must be one of {', '.join(BACKENDS)}; got {_backend!r}")


def set_backend(name):
    """Choose the kernels: "auto" (the fastest available), "native" (C++/CUDA), "triton", or "torch"
    (the plain PyTorch reference)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _backend = name
    if name == "triton":
        # Register the Triton ops now, outside any torch.compile region: torch.compile cannot trace the
        # registration (torch.library.triton_op), only calls of ops already registered. Without triton the
        # backend still works: every op falls back (kernel_path).
        try:
            triton_ops()
        except ImportError:
            pass


def get_backend():
    return _backend


def native_available(t):
    """Whether a compiled kernel exists for t's device."""
    if not HAS_C or _backend == "torch":
        return False
    return t.device.type == "cpu" or (t.device.type == "cuda" and CUDA_BUILT)


def triton_available(t):
    """Whether the Triton kernels can run on t's device: a GPU, or the CPU under TRITON_INTERPRET=1 (set before
    triton is imported; tests only: the interpreter is slow)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    if t.device.type == "cuda":
        return True
    return t.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "") == "1"


def kernel_path(t):
    """Which implementation the ops run for tensors like t: "native", "triton" or "torch".

    "auto" and "native" take the compiled kernel of t's device, then Triton, then the reference; "auto" takes
    the reference for CUDA tensors until GPU_KERNELS_VERIFIED (above), and then the CUDA kernel until GPU
    timings say Triton is faster. "triton" takes Triton where it can run
    and otherwise falls back the same way, so a script that chose Triton for its GPU work still runs its CPU
    work. "torch" is always the reference.
    """
    if _backend == "torch":
        return "torch"
    if _backend == "auto" and t.device.type == "cuda" and not GPU_KERNELS_VERIFIED:
        return "torch"
    if _backend == "triton" and triton_available(t):
        return "triton"
    if native_available(t):
        return "native"
    if t.device.type == "cuda" and triton_available(t):
        return "triton"
    return "torch"


_triton_ops = None


def triton_ops():
    """The Triton ops (torch.ops.ign_fast.*_triton), registered on first use so that importing ign_fast never
    imports triton (TRITON_INTERPRET must be set before that import)."""
    global _triton_ops
    if _triton_ops is None:
        _triton_ops = _register_triton_ops()
    return _triton_ops


# ---------------------------------------------------------------------------------------------------------
# per_sample_distance

def per_sample_distance(a, b, kind="l1"):
    """d(a, b)_i = mean over non-batch dims of |a-b| ("l1") or (a-b)^2 ("l2"); a [B] tensor in float32
    (float64 for float64 inputs), accumulated in float32 or wider. Differentiable in a and b."""
    check_tensor("a", a)
    check_same("b", b, "a", a)
    check_distance_kind("kind", kind)
    check_nonempty_rows("a", a)
    path = kernel_path(a)
    if path == "native":
        return torch.ops.ign_fast.per_sample_distance(a, b, kind)
    if path == "triton":
        return triton_ops().per_sample_distance(a, b, kind)
    return reference.per_sample_distance(a, b, kind)


def _per_sample_distance_fake(a, b, kind):
    return a.new_empty((a.shape[0],), dtype=reference.accumulate_dtype(a.dtype))


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


if HAS_C:
    torch.library.register_fake("ign_fast::per_sample_distance")(_per_sample_distance_fake)
    torch.library.register_fake("ign_fast::per_sample_distance_backward")(_per_sample_distance_backward_fake)
    torch.library.register_autograd("ign_fast::per_sample_distance", _per_sample_distance_backward,
                                    setup_context=_per_sample_distance_setup)


# ---------------------------------------------------------------------------------------------------------
# ign_loss
#
# Contract of ign_fast::ign_loss (schema in csrc/ops.cpp; the same for the Triton twin ign_loss_triton):
#   ign_loss(x, fx, fz, f_fz, ff_z, kind, lambda_rec, lambda_idem, lambda_tight, tight_clamp_ratio?)
#     -> (total, rec, idem, tight, tight_unclamped)
#   x, fx: [Bx, *S]; fz, f_fz, ff_z: [Bz, *S]; one floating dtype and device; Bx, Bz > 0 and Bx == Bz with the
#   clamp. rec [Bx], idem/tight/tight_unclamped [Bz] and total (0-dim) are float32 (float64 for float64).
#   Values exactly IGNLoss.forward (reference.ign_loss). tight_unclamped (t_i = -d(ff_z, fz)_i) is saved for
#   the backward with rec and is not differentiable.
#   Autograd (registered below): total, rec, idem and tight are differentiable in x, fx, fz, f_fz, ff_z, as
#     rec = d(fx, x), idem = d(f_fz, fz), t = -d(ff_z, sg fz), tight = clamp(t, rec) (rec not detached).
#   With D(a, b) = dd(a, b)/da (sign(a-b)/n for l1, 2(a-b)/n for l2) every gradient is a per-row multiple:
#     grad_fx = c_rec·D(fx, x), grad_x = -grad_fx, grad_f_fz = c_idem·D(f_fz, fz), grad_fz = -grad_f_fz
#     (the tight term sees sg fz), grad_ff_z = -c_tight·D(ff_z, fz), where c_rec holds the clamp's dependence
#     on rec_i (csrc/ign_loss.h, row_scales). ign_loss_backward computes them in one pass from the saved rec
#     and t; grad_x is written only when x needs it (else an empty [0] tensor comes back).
#   f_fz and ff_z may be one tensor (a fused step passes t and t.detach(): same storage, offset and strides);
#   the kernels then read it once, and the gradient of each role is still returned separately.
#   Not twice differentiable: ign_loss_backward has no autograd formula.

def _check_ign_loss_args(x, fx, fz, f_fz, ff_z, kind, lambda_rec, lambda_idem, lambda_tight, tight_clamp_ratio):
    check_tensor("x", x)
    check_same("fx", fx, "x", x)
    check_tensor("fz", fz)
    if fz.shape[1:] != x.shape[1:]:
        raise ValueError(f"fz must have per-sample shape {tuple(x.shape[1:])} like x, got {tuple(fz.shape)}")
    check_same("f_fz", f_fz, "fz", fz)
    check_same("ff_z", ff_z, "fz", fz)
    if fz.device != x.device:
        raise ValueError(f"fz must be on the device of x ({x.device}), got {fz.device}")
    check_distance_kind("kind", kind)
    if x.shape[0] == 0 or fz.shape[0] == 0:
        raise ValueError(f"x and fz must hold at least one sample, got shapes {tuple(x.shape)} and {tuple(fz.shape)}")
    check_nonempty_rows("x", x)
    lambdas = tuple(check_nonnegative_float(name, value) for name, value in
                    (("lambda_rec", lambda_rec), ("lambda_idem", lambda_idem), ("lambda_tight", lambda_tight)))
    tight_clamp_ratio = check_clamp_ratio(tight_clamp_ratio)
    if tight_clamp_ratio is not None:
        if fz.shape[0] != x.shape[0]:
            raise ValueError(f"with tight_clamp_ratio, fz must have the batch size of x ({x.shape[0]}), "
                             f"got {fz.shape[0]}")
    return lambdas + (tight_clamp_ratio,)


def ign_loss(x, fx, fz, f_fz, ff_z, kind="l1", lambda_rec=20.0, lambda_idem=20.0, lambda_tight=2.5,
             tight_clamp_ratio=1.5):
    """The IGN objective in one pass: (total, rec, idem, tight), total 0-dim, the others per sample.

    f_fz = f_θ'(f_θ(z)) carries the idem role (its gradient flows into fz), ff_z = f_θ(sg f_θ(z)) the tight
    role; they may be one tensor. tight_clamp_ratio=None turns the clamp off. See the contract above.
    """
    lambda_rec, lambda_idem, lambda_tight, tight_clamp_ratio = _check_ign_loss_args(
        x, fx, fz, f_fz, ff_z, kind, lambda_rec, lambda_idem, lambda_tight, tight_clamp_ratio)
    args = (x, fx, fz, f_fz, ff_z, kind, lambda_rec, lambda_idem, lambda_tight, tight_clamp_ratio)
    path = kernel_path(x)
    if fz.dtype != x.dtype:  # the kernels take one dtype; the reference handles a mix as IGNLoss always did
        path = "torch"
    if path == "native":
        return torch.ops.ign_fast.ign_loss(*args)[:4]
    if path == "triton":
        return triton_ops().ign_loss(*args)[:4]
    return reference.ign_loss(*args)


def _ign_loss_fake(x, fx, fz, f_fz, ff_z, kind, lambda_rec, lambda_idem, lambda_tight, tight_clamp_ratio):
    acc = reference.accumulate_dtype(x.dtype)
    return (x.new_empty((), dtype=acc), x.new_empty((x.shape[0],), dtype=acc),
            *(x.new_empty((fz.shape[0],), dtype=acc) for _ in range(3)))


def _ign_loss_backward_fake(grad_total, grad_rec, grad_idem, grad_tight, x, fx, fz, f_fz, ff_z, rec,
                            tight_unclamped, kind, lambda_rec, lambda_idem, lambda_tight, tight_clamp_ratio,
                            compute_grad_x):
    def like(t):
        return torch.empty_like(t, memory_format=torch.contiguous_format)

    return (like(x) if compute_grad_x else x.new_empty((0,))), like(x), like(fz), like(fz), like(fz)


def _ign_loss_setup(ctx, inputs, output):
    x, fx, fz, f_fz, ff_z, kind, lambda_rec, lambda_idem, lambda_tight, tight_clamp_ratio = inputs
    _, rec, _, _, tight_unclamped = output
    ctx.save_for_backward(x, fx, fz, f_fz, ff_z, rec, tight_unclamped)
    ctx.mark_non_differentiable(tight_unclamped)
    # unused per-sample outputs then reach backward as None, and the kernel skips their loads
    ctx.set_materialize_grads(False)
    ctx.config = (kind, lambda_rec, lambda_idem, lambda_tight, tight_clamp_ratio)


def _make_ign_loss_backward(backward_op):
    def backward(ctx, grad_total, grad_rec, grad_idem, grad_tight, _grad_unclamped):
        x, fx, fz, f_fz, ff_z, rec, tight_unclamped = ctx.saved_tensors
        if grad_total is None:
            grad_total = torch.zeros((), dtype=rec.dtype, device=rec.device)
        need_x = ctx.needs_input_grad[0]
        grads = backward_op(grad_total, grad_rec, grad_idem, grad_tight, x, fx, fz, f_fz, ff_z, rec,
                            tight_unclamped, *ctx.config, need_x)
        return (grads[0] if need_x else None, *grads[1:], None, None, None, None, None)

    return backward


if HAS_C:
    torch.library.register_fake("ign_fast::ign_loss")(_ign_loss_fake)
    torch.library.register_fake("ign_fast::ign_loss_backward")(_ign_loss_backward_fake)
    torch.library.register_autograd(
        "ign_fast::ign_loss", _make_ign_loss_backward(lambda *a: torch.ops.ign_fast.ign_loss_backward(*a)),
        setup_context=_ign_loss_setup)


# ---------------------------------------------------------------------------------------------------------
# Triton twins of the ops above (kernels/ in the source tree): same schemas, fake kernels and autograd.

class _TritonOps:
    def __init__(self, per_sample_distance, ign_loss, nearest_neighbors):
        self.per_sample_distance = per_sample_distance
        self.ign_loss = ign_loss
        self.nearest_neighbors = nearest_neighbors


def _register_triton_ops():
    from torch import Tensor

    from .kernels import ign_loss as ign_loss_kernels
    from .kernels import nearest_neighbors as neighbor_kernels
    from .kernels import per_sample_distance as distance_kernels

    @torch.library.triton_op("ign_fast::per_sample_distance_triton", mutates_args=())
    def per_sample_distance_triton(a: Tensor, b: Tensor, kind: str) -> Tensor:
        return distance_kernels.forward(a.contiguous(), b.contiguous(), kind)

    @torch.library.triton_op("ign_fast::per_sample_distance_backward_triton", mutates_args=())
    def per_sample_distance_backward_triton(grad: Tensor, a: Tensor, b: Tensor, kind: str) -> tuple[Tensor, Tensor]:
        acc = reference.accumulate_dtype(a.dtype)
        grad_a, grad_b = distance_kernels.backward(grad.to(acc).contiguous(), a.contiguous(), b.contiguous(), kind)
        return grad_a.view(a.shape), grad_b.view(a.shape)

    per_sample_distance_triton.register_fake(_per_sample_distance_fake)
    per_sample_distance_backward_triton.register_fake(_per_sample_distance_backward_fake)

    def distance_backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad_a, grad_b = per_sample_distance_backward_triton(grad, a, b, ctx.kind)
        return grad_a, grad_b, None

    per_sample_distance_triton.register_autograd(distance_backward, setup_context=_per_sample_distance_setup)

    def contiguous_pair(f_fz, ff_z):
        f_fzc = f_fz.contiguous()
        return f_fzc, (f_fzc if ign_loss_kernels.same_tensor(f_fz, ff_z) else ff_z.contiguous())

    @torch.library.triton_op("ign_fast::ign_loss_triton", mutates_args=())
    def ign_loss_triton(x: Tensor, fx: Tensor, fz: Tensor, f_fz: Tensor, ff_z: Tensor, kind: str,
                        lambda_rec: float, lambda_idem: float, lambda_tight: float,
                        tight_clamp_ratio: Optional[float]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return ign_loss_kernels.forward(x.contiguous(), fx.contiguous(), fz.contiguous(), *contiguous_pair(f_fz, ff_z),
                                        kind, lambda_rec, lambda_idem, lambda_tight, tight_clamp_ratio)

    @torch.library.triton_op("ign_fast::ign_loss_backward_triton", mutates_args=())
    def ign_loss_backward_triton(grad_total: Tensor, grad_rec: Optional[Tensor], grad_idem: Optional[Tensor],
                                 grad_tight: Optional[Tensor], x: Tensor, fx: Tensor, fz: Tensor, f_fz: Tensor,
                                 ff_z: Tensor, rec: Tensor, tight_unclamped: Tensor, kind: str, lambda_rec: float,
                                 lambda_idem: float, lambda_tight: float, tight_clamp_ratio: Optional[float],
                                 compute_grad_x: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        grads = ign_loss_kernels.backward(
            grad_total, grad_rec, grad_idem, grad_tight, x.contiguous(), fx.contiguous(), fz.contiguous(),
            *contiguous_pair(f_fz, ff_z), rec, tight_unclamped, kind, lambda_rec, lambda_idem, lambda_tight,
            tight_clamp_ratio, compute_grad_x)
        grad_x = grads[0].view(x.shape) if compute_grad_x else grads[0]
        return grad_x, grads[1].view(x.shape), *(g.view(fz.shape) for g in grads[2:])

    ign_loss_triton.register_fake(_ign_loss_fake)
    ign_loss_backward_triton.register_fake(_ign_loss_backward_fake)
    ign_loss_triton.register_autograd(_make_ign_loss_backward(ign_loss_backward_triton),
                                      setup_context=_ign_loss_setup)

    # Registered like the others so torch.compile sees one op (with a fake kernel) instead of a Python
    # function it cannot trace. Not differentiable: the index is discrete (see nearest_neighbors).
    @torch.library.triton_op("ign_fast::nearest_neighbors_triton", mutates_args=())
    def nearest_neighbors_triton(queries: Tensor, candidates: Tensor, metric: str) -> tuple[Tensor, Tensor]:
        return neighbor_kernels.nearest_neighbors_triton(queries, candidates, metric)

    nearest_neighbors_triton.register_fake(_nearest_neighbors_fake)
    return _TritonOps(per_sample_distance_triton, ign_loss_triton, nearest_neighbors_triton)


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
    # kernel_path, as every op: "triton" only where Triton can run, so set_backend("triton") with CPU tensors
    # (and no interpreter) takes the C++ kernel or the reference instead of raising
    path = kernel_path(q)
    if path == "triton":
        return triton_ops().nearest_neighbors(q, c, metric)
    # the CUDA kernel packs (float32 distance, index) into one 64-bit word: float64 on CUDA uses the reference
    if path == "native" and not (q.is_cuda and q.dtype == torch.float64):
        return torch.ops.ign_fast.nearest_neighbors(q, c, metric)
    return reference.nearest_neighbors(q, c, metric)


def _nearest_neighbors_fake(queries, candidates, metric):
    torch._check(queries.dim() == 2 and candidates.dim() == 2, lambda: "queries and candidates must be 2-D")
    torch._check(queries.shape[1] == candidates.shape[1], lambda: "queries and candidates must share D")
    batch = queries.shape[0]
    return (queries.new_empty((batch,), dtype=torch.int64),
            queries.new_empty((batch,), dtype=reference.accumulate_dtype(queries.dtype)))


if HAS_C:
    torch.library.register_fake("ign_fast::nearest_neighbors")(_nearest_neighbors_fake)
