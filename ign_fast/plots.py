"""Pictures of samples and of what a model learned.

Image grids (pillow only) live in ign_fast.images and are re-exported here; every function defined here
needs matplotlib, an optional dependency imported on first use. The matplotlib functions draw on a
bare ``Figure`` (no pyplot), so they touch no global backend or figure state and work headless.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import numpy as np
import torch

from .images import image_grid, replace_atomically, save_image_grid  # noqa: F401  (re-exported)
from .validation import check_positive_int


# ----------------------------------------------------------------------------- matplotlib plots


def _new_figure(figsize: tuple[float, float]):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("this plot needs matplotlib: pip install matplotlib") from None
    return Figure(figsize=figsize, layout="constrained")


def _save_figure(fig, path: str | os.PathLike, dpi: int) -> str:
    fmt = os.path.splitext(os.fspath(path))[1].lstrip(".").lower() or "png"
    return replace_atomically(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=dpi))


def _as_numpy(name: str, x: Any, columns: int | None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    x = np.asarray(x, dtype=np.float64)
    if columns == 1 and x.ndim == 2 and x.shape[1] == 1:
        x = x[:, 0]
    if (columns == 1 and x.ndim != 1) or (columns == 2 and (x.ndim != 2 or x.shape[1] != 2)):
        want = "[N] or [N, 1]" if columns == 1 else "[N, 2]"
        raise ValueError(f"{name} must be {want}, got shape {x.shape}")
    if x.shape[0] == 0 or not np.isfinite(x).all():
        raise ValueError(f"{name} must be non-empty and finite")
    return x


def save_histogram_1d(samples: Any, target: Any, path: str | os.PathLike, bins: int = 100,
                      title: str | None = None, dpi: int = 120) -> str:
    """Density histograms of 1-D samples over the target data's, on shared bin edges."""
    s = _as_numpy("samples", samples, 1)
    t = _as_numpy("target", target, 1)
    bins = check_positive_int("bins", bins)
    lo, hi = min(s.min(), t.min()), max(s.max(), t.max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    fig = _new_figure((6, 3.5))
    ax = fig.subplots()
    ax.hist(t, bins=edges, density=True, histtype="stepfilled", color="0.8", label=f"target (n={len(t)})")
    ax.hist(s, bins=edges, density=True, histtype="step", color="C0", linewidth=1.5, label=f"samples (n={len(s)})")
    ax.set_xlabel("x")
    ax.set_ylabel("density")
    ax.legend(loc="upper right")
    if title:
        ax.set_title(title)
    return _save_figure(fig, path, dpi)


def save_scatter_2d(samples: Any, target: Any, path: str | os.PathLike, max_points: int = 5000,
                    title: str | None = None, dpi: int = 120) -> str:
    """2-D samples over the target data (grey), equal axis scales; at most ``max_points`` of each
    (the first ones) so big sets stay readable."""
    s = _as_numpy("samples", samples, 2)[:check_positive_int("max_points", max_points)]
    t = _as_numpy("target", target, 2)[:max_points]
    fig = _new_figure((5, 5))
    ax = fig.subplots()
    ax.scatter(t[:, 0], t[:, 1], s=3, color="0.7", label="target", rasterized=True)
    ax.scatter(s[:, 0], s[:, 1], s=3, color="C0", alpha=0.6, label="samples", rasterized=True)
    ax.set_aspect("equal")
    ax.legend(loc="upper right", markerscale=4)
    if title:
        ax.set_title(title)
    return _save_figure(fig, path, dpi)


def _check_limits(name: str, lim: Sequence[float]) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in lim)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair of numbers, got {lim!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"{name} must be finite with low < high, got {lim!r}")
    return lo, hi


def save_distance_field(model: torch.nn.Module, path: str | os.PathLike,
                        xlim: Sequence[float] = (-3.0, 3.0), ylim: Sequence[float] = (-3.0, 3.0),
                        resolution: int = 200, data: Any = None, title: str | None = None, dpi: int = 120) -> str:
    """Heat map of the drift ||f(y) - y|| (root-mean-square over the 2 coordinates, as
    ``manifold.manifold_distance``) of a 2-D model on a resolution x resolution grid; ``data``
    ([N, 2], optional) is drawn on top. Dark = on the learned manifold."""
    from .manifold import manifold_distance

    x0, x1 = _check_limits("xlim", xlim)
    y0, y1 = _check_limits("ylim", ylim)
    resolution = check_positive_int("resolution", resolution)
    xs = torch.linspace(x0, x1, resolution)
    ys = torch.linspace(y0, y1, resolution)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    points = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)
    drift = manifold_distance(model, points).reshape(resolution, resolution).numpy()
    fig = _new_figure((5.6, 5))
    ax = fig.subplots()
    image = ax.imshow(drift, origin="lower", extent=(x0, x1, y0, y1), cmap="magma", aspect="equal")
    fig.colorbar(image, ax=ax, label="drift ||f(y) - y|| (rms)")
    if data is not None:
        d = _as_numpy("data", data, 2)
        ax.scatter(d[:, 0], d[:, 1], s=2, color="cyan", alpha=0.5, rasterized=True)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    if title:
        ax.set_title(title)
    return _save_figure(fig, path, dpi)


def save_class_histogram(histogram: Any, path: str | os.PathLike, title: str | None = None, dpi: int = 120) -> str:
    """Bar chart of class shares (``metrics.mode_coverage(...)["histogram"]``, or that whole dict)
    with the uniform share as a dashed line."""
    if isinstance(histogram, dict):
        histogram = histogram.get("histogram")
    shares = _as_numpy("histogram", histogram, 1)
    fig = _new_figure((6, 3.5))
    ax = fig.subplots()
    classes = np.arange(len(shares))
    ax.bar(classes, shares, color="C0")
    ax.axhline(1.0 / len(shares), color="0.3", linestyle="--", linewidth=1, label="uniform")
    ax.set_xticks(classes)
    ax.set_xlabel("class")
    ax.set_ylabel("share of samples")
    ax.legend(loc="upper right")
    if title:
        ax.set_title(title)
    return _save_figure(fig, path, dpi)
