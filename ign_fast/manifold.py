"""What a trained IGN says about points: the drift field ||f(y) - y||, an energy on it, and OOD checks.

An idempotent f is the identity on its target manifold and moves everything else onto it, so the
drift delta(y) = ||f(y) - y|| reads as a distance to the manifold (NAIGN, Al-Jaff et al. 2025) and
as an out-of-distribution score: small on data, large off it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from .validation import check_distance_kind, check_finite, check_positive_float, check_positive_int, check_tensor


def _model_placement(model: Any, y: torch.Tensor) -> tuple[torch.device, torch.dtype]:
    """Device and input dtype to feed the model: its first floating parameter's, else y's."""
    if isinstance(model, nn.Module):
        for p in model.parameters():
            if p.dtype.is_floating_point:
                return p.device, p.dtype
    return y.device, y.dtype


@torch.no_grad()
def manifold_distance(model: nn.Module, y: torch.Tensor, steps: int = 1, distance: str = "l2",
                      batch_size: int = 1024) -> torch.Tensor:
    """Drift delta(y) = ||f^steps(y) - y|| per sample, a [N] tensor on y's device.

    f^steps applies the model ``steps`` times (steps=1: f(y)). The norm is normalised per element
    so images and toy vectors of any size read alike: "l2" is the root-mean-square difference
    sqrt(mean((f(y) - y)^2)), "l1" the mean absolute difference mean(|f(y) - y|), both over all
    non-batch dims. Runs without gradients and in eval mode (so BatchNorm uses its running
    statistics; the model's mode is restored), ``batch_size`` samples at a time on the model's device
    and in its dtype. Float32 result (float64 for float64 y).
    """
    if not callable(model):
        raise TypeError(f"model must be an nn.Module or callable, got {type(model).__name__}")
    check_tensor("y", y)
    if y.shape[0] > 0 and y[0].numel() == 0:
        raise ValueError(f"y must have at least one element per sample, got shape {tuple(y.shape)}")
    steps = check_positive_int("steps", steps)
    check_distance_kind("distance", distance)
    batch_size = check_positive_int("batch_size", batch_size)
    out_dtype = torch.float64 if y.dtype == torch.float64 else torch.float32
    is_module = isinstance(model, nn.Module)
    device, in_dtype = _model_placement(model, y)
    was_training = model.training if is_module else False
    if is_module:
        model.eval()
    result = torch.empty(y.shape[0], dtype=out_dtype, device=y.device)
    try:
        for start in range(0, y.shape[0], batch_size):
            batch = y[start:start + batch_size].to(device)
            moved = batch.to(in_dtype)  # e.g. float64 y into a float32 model
            for _ in range(steps):
                moved = model(moved)
            diff = (moved.to(out_dtype) - batch.to(out_dtype)).reshape(batch.shape[0], -1)
            d = diff.square().mean(1).sqrt() if distance == "l2" else diff.abs().mean(1)
            result[start:start + batch.shape[0]] = d.to(y.device)
    finally:
        if is_module:
            model.train(was_training)
    return result


def energy(model: nn.Module, y: torch.Tensor, temperature: float = 1.0, batch_size: int = 1024) -> torch.Tensor:
    """Energy E(y) = delta(y)^2 / temperature, with delta the root-mean-square drift of
    ``manifold_distance`` (so E is the IGN l2 reconstruction term mean((f(y) - y)^2) over temperature).

    exp(-E(y)) is NAIGN's unnormalised density surrogate: 1 on the manifold, decaying with the
    squared distance to it; temperature sets how fast. A [N] tensor on y's device.
    """
    t = check_positive_float("temperature", temperature)
    return manifold_distance(model, y, distance="l2", batch_size=batch_size).square() / t


def _check_scores(name: str, scores: Any) -> torch.Tensor:
    if isinstance(scores, (list, tuple, np.ndarray)):
        scores = torch.as_tensor(np.asarray(scores, dtype=np.float64))
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, array or list of numbers, got {type(scores).__name__}")
    if scores.dtype == torch.bool or scores.is_complex():
        raise TypeError(f"{name} must hold real numbers, got {scores.dtype}")
    scores = scores.detach().reshape(-1).to("cpu", torch.float64)
    if scores.numel() == 0:
        raise ValueError(f"{name} must hold at least one score")
    if bool(scores.isnan().any()):
        raise ValueError(f"{name} contains NaN")
    return scores


def auroc(scores_in: Any, scores_out: Any) -> float:
    """Area under the ROC curve for telling ``scores_out`` (out-of-distribution, should score higher)
    from ``scores_in``: P(out > in) + P(out == in) / 2 over all pairs (Mann-Whitney U / (n_in n_out)).

    Exact: ties get their group's mean rank, kept as twice the rank in int64 so no rounding happens
    before the final division. 1.0 perfect separation, 0.5 chance or identical sets, 0.0 reversed.
    """
    a = _check_scores("scores_in", scores_in)
    b = _check_scores("scores_out", scores_out)
    n_in, n_out = a.numel(), b.numel()
    _, inverse, counts = torch.unique(torch.cat([a, b]), sorted=True, return_inverse=True, return_counts=True)
    last = counts.cumsum(0)  # 1-based rank of the last member of each tie group
    twice_mean_rank = 2 * last - counts + 1  # first + last rank of the group
    twice_rank_sum_out = int(twice_mean_rank[inverse[n_in:]].sum())
    twice_u = twice_rank_sum_out - n_out * (n_out + 1)
    return twice_u / (2 * n_in * n_out)


def _rotate_90(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 4 and x.shape[-1] == x.shape[-2]:
        return torch.rot90(x, 1, dims=(-2, -1))
    if x.dim() == 2 and x.shape[1] == 2:
        return torch.stack([-x[:, 1], x[:, 0]], dim=1)
    raise ValueError(f"heldout must be square images [N, C, H, H] or 2-D points [N, 2] to rotate by 90 degrees, "
                     f"got shape {tuple(x.shape)}")


@torch.no_grad()
def ood_report(model: nn.Module, heldout: torch.Tensor, generator: torch.Generator | None = None,
               batch_size: int = 1024) -> dict:
    """AUROC of the drift score (root-mean-square ``manifold_distance``) for held-out data against
    four out-of-distribution sets of the same size: standard gaussian noise, uniform noise over the
    held-out value range, inverted data (-x) and data rotated by 90 degrees (images: a quarter turn
    of the picture; 2-D points: of the plane).

    1.0 means every OOD point drifts more than every held-out one. generator: CPU generator for the
    noise (default: seeded with 0, so reports are reproducible). Returns {"gaussian_noise",
    "uniform_noise", "inverted", "rotated_90"} -> AUROC.
    """
    check_tensor("heldout", heldout, min_dim=2)
    check_finite("heldout", heldout)
    if heldout.shape[0] == 0:
        raise ValueError(f"heldout must hold at least one sample, got shape {tuple(heldout.shape)}")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    elif not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    rotated = _rotate_90(heldout)
    shape, dtype = tuple(heldout.shape), heldout.dtype
    low, high = float(heldout.min()), float(heldout.max())
    gen_device = generator.device
    gaussian = torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(heldout.device)
    uniform = (low + (high - low) * torch.rand(shape, generator=generator, device=gen_device, dtype=dtype))
    outliers = {"gaussian_noise": gaussian, "uniform_noise": uniform.to(heldout.device),
                "inverted": -heldout, "rotated_90": rotated}
    scores_in = manifold_distance(model, heldout, batch_size=batch_size)
    return {name: auroc(scores_in, manifold_distance(model, x, batch_size=batch_size))
            for name, x in outliers.items()}
