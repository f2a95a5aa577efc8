"""Noise priors z ~ p(z) for IGN, storable in a checkpoint and rebuildable without data.

A prior is an ``nn.Module``: its statistics are buffers (so ``state_dict()``
carries them) and ``to_config()`` gives the JSON-able rest, so
``build_prior(prior.to_config(), state_dict=prior.state_dict())`` rebuilds it.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn

PRIOR_KINDS = ("gaussian", "fourier", "mixture")


def _check_shape(shape: Any) -> tuple[int, ...]:
    if isinstance(shape, (int, torch.Size)) and not isinstance(shape, bool):
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if not isinstance(shape, (tuple, list)) or not shape:
        raise TypeError(f"shape must be a non-empty tuple of ints, got {shape!r}")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"shape must hold positive ints, got {list(shape)}")
    return tuple(shape)


def _check_count(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return n


class NoisePrior(nn.Module):
    """Base class: ``sample(n)`` -> [n, *shape]."""

    kind: str = ""

    def __init__(self, shape: Sequence[int]):
        super().__init__()
        self.shape = _check_shape(shape)
        # Empty, unsaved buffer that follows .to(device): the default device of sample().
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)

    def to_config(self) -> dict:
        return {"kind": self.kind, "shape": list(self.shape)}

    def _standard_normal(self, n: int, generator: torch.Generator | None, device: torch.device,
                         dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
        # Draw on the generator's own device so the same generator always gives the same
        # numbers, then move; without a generator draw straight on the target device.
        draw_device = generator.device if generator is not None else device
        eps = torch.randn((n, *shape), generator=generator, device=draw_device, dtype=dtype)
        return eps.to(device)

    def _default_device(self) -> torch.device:
        return self._device_anchor.device

    def sample(self, n: int, generator: torch.Generator | None = None,
               device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.sample(n, generator)


class GaussianPrior(NoisePrior):
    """Standard normal noise of a given per-sample shape."""

    kind = "gaussian"

    def sample(self, n, generator=None, device=None, dtype=torch.float32):
        n = _check_count(n)
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        device = torch.device(device) if device is not None else self._default_device()
        return self._standard_normal(n, generator, device, dtype, self.shape)


class FourierPrior(NoisePrior):
    """Gaussian noise with the data's per-channel, per-frequency rfft2 mean and std.

    Real and imaginary parts of every rfft2 bin are drawn independently. Columns 0
    and W/2 (even W) of an rfft2 are Hermitian along H: bin k1 is the conjugate of
    bin H-k1 and bins k1 = 0, H/2 are real. Drawing those pairs independently would
    let irfft2 average them and halve their variance, so only one of each pair is
    drawn, its partner is set to the conjugate and the real bins get no imaginary
    part; rfft2 of a sample then has the fitted mean and std in every bin.
    """

    kind = "fourier"

    def __init__(self, shape: Sequence[int]):
        super().__init__(shape)
        if len(self.shape) != 3:
            raise ValueError(f"shape must be (C, H, W) for a fourier prior, got {list(self.shape)}")
        c, h, w = self.shape
        spectrum = (c, h, w // 2 + 1)
        self.register_buffer("mean_real", torch.zeros(spectrum))
        self.register_buffer("std_real", torch.zeros(spectrum))
        self.register_buffer("mean_imag", torch.zeros(spectrum))
        self.register_buffer("std_imag", torch.zeros(spectrum))
        # Number of samples the statistics came from; 0 marks an unfitted prior.
        self.register_buffer("num_fitted", torch.zeros((), dtype=torch.long))

    def _hermitian_columns(self) -> list[int]:
        w = self.shape[2]
        return [0, w // 2] if w % 2 == 0 else [0]

    def _row_mirror(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mirror row of each row, rows that keep their own draw, self-conjugate rows)."""
        rows = torch.arange(self.shape[1], device=device)
        mirror = (-rows) % self.shape[1]
        return mirror, rows <= mirror, rows == mirror

    @classmethod
    @torch.no_grad()
    def fit(cls, data: torch.Tensor, chunk_size: int = 1024) -> "FourierPrior":
        """Fit to real images [N, C, H, W] (N >= 2); statistics are accumulated in float64 by chunks."""
        if not isinstance(data, torch.Tensor):
            raise TypeError(f"data must be a torch.Tensor, got {type(data).__name__}")
        if data.dim() != 4 or not data.dtype.is_floating_point or data.is_complex():
            raise ValueError(f"data must be a real float tensor [N, C, H, W], got {data.dtype} {list(data.shape)}")
        if data.shape[0] < 2:
            raise ValueError(f"data must hold at least 2 samples to estimate a std, got {data.shape[0]}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        prior = cls(tuple(data.shape[1:]))
        sums = torch.zeros((4, *prior.mean_real.shape), dtype=torch.float64, device=data.device)
        for start in range(0, data.shape[0], chunk_size):
            spec = torch.fft.rfft2(data[start:start + chunk_size].to(torch.float64))
            if not bool(torch.isfinite(spec.real).all() & torch.isfinite(spec.imag).all()):
                raise ValueError("data contains NaN or inf")
            sums[0] += spec.real.sum(0)
            sums[1] += spec.imag.sum(0)
            sums[2] += spec.real.square().sum(0)
            sums[3] += spec.imag.square().sum(0)
        n = data.shape[0]
        mean_re, mean_im = sums[0] / n, sums[1] / n
        std_re = (sums[2] / n - mean_re.square()).clamp_min(0).sqrt()
        std_im = (sums[3] / n - mean_im.square()).clamp_min(0).sqrt()
        # Make the Hermitian columns exactly consistent (the data's are only up to rounding),
        # so the stored statistics are precisely what sample() reproduces.
        mirror, _, self_conj = prior._row_mirror(data.device)
        for j in prior._hermitian_columns():
            mean_re[..., j] = (mean_re[..., j] + mean_re[..., mirror, j]) / 2
            mean_im[..., j] = (mean_im[..., j] - mean_im[..., mirror, j]) / 2
            std_re[..., j] = (std_re[..., j] + std_re[..., mirror, j]) / 2
            std_im[..., j] = (std_im[..., j] + std_im[..., mirror, j]) / 2
            std_im[..., self_conj, j] = 0.0
        for name, value in (("mean_real", mean_re), ("std_real", std_re),
                            ("mean_imag", mean_im), ("std_imag", std_im)):
            getattr(prior, name).copy_(value.float())
        prior.num_fitted.fill_(n)
        return prior.to(data.device)

    def sample(self, n, generator=None, device=None, dtype=torch.float32):
        n = _check_count(n)
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        if int(self.num_fitted) == 0:
            raise RuntimeError("FourierPrior has no statistics: use FourierPrior.fit(data) or load a state_dict")
        device = torch.device(device) if device is not None else self._default_device()
        # FFTs need float32/float64; keep float64 when asked for it.
        work = torch.float64 if dtype == torch.float64 else torch.float32
        c, h, w = self.shape
        eps = self._standard_normal(n, generator, device, work, (2, c, h, w // 2 + 1))
        mean_re, std_re, mean_im, std_im = (
            b.to(device=device, dtype=work) for b in (self.mean_real, self.std_real, self.mean_imag, self.std_imag))
        real = mean_re + std_re * eps[:, 0]
        imag = mean_im + std_im * eps[:, 1]
        mirror, keep, self_conj = self._row_mirror(device)
        for j in self._hermitian_columns():  # [n, C, H] slices; masks broadcast over H
            real[..., j] = torch.where(keep, real[..., j], real[..., mirror, j])
            imag[..., j] = torch.where(keep, imag[..., j], -imag[..., mirror, j])
            imag[..., j] = imag[..., j].masked_fill(self_conj, 0.0)
        images = torch.fft.irfft2(torch.complex(real, imag), s=(h, w))
        return images.to(dtype)


def kmeans(flat: torch.Tensor, k: int, iterations: int = 25, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means of the rows of ``flat`` [N, D] with k-means++ seeding, deterministic under ``seed``:
    the centers [k, D] and each row's cluster [N]. A cluster that empties keeps its center."""
    generator = torch.Generator().manual_seed(seed)
    flat_cpu = flat.cpu()
    centers = flat_cpu[torch.randint(flat_cpu.shape[0], (1,), generator=generator)]
    for _ in range(1, k):  # k-means++: the next center drawn with probability proportional to d^2
        d2 = torch.cdist(flat_cpu, centers).square().min(1).values
        pick = (torch.multinomial(d2 / d2.sum(), 1, generator=generator) if float(d2.sum()) > 0
                else torch.randint(flat_cpu.shape[0], (1,), generator=generator))  # all rows equal a center
        centers = torch.cat([centers, flat_cpu[pick]])
    centers = centers.to(flat.device)
    for _ in range(iterations):
        assign = torch.cdist(flat, centers).argmin(1)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centers).index_add_(0, assign, flat)
        moved = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centers)
        if torch.equal(moved, centers):
            break
        centers = moved
    return centers, torch.cdist(flat, centers).argmin(1)


def mixture_from_noise(eps: torch.Tensor, boundaries: torch.Tensor, means: torch.Tensor, stds: torch.Tensor,
                       directions: torch.Tensor, residual_stds: torch.Tensor) -> torch.Tensor:
    """A mixture of probabilistic PCA Gaussians as a deterministic map of standard normal eps [n, 1 + r + D]:
    eps[:, 0] picks the component (its normal CDF against the cumulative weights ``boundaries`` [K - 1]),
    eps[:, 1:1 + r] moves along that component's r directions scaled by its stds, the rest is its isotropic
    residual. means [K, D], stds [K, r], directions [K, r, D], residual_stds [K]. Plain tensor ops only, so
    that TorchScript, torch.export and ONNX run the same map (ign_fast.export)."""
    k, d = means.shape
    r = stds.shape[1]
    u = 0.5 * (1.0 + torch.erf(eps[:, 0] / math.sqrt(2.0)))
    which = (u.unsqueeze(1) > boundaries).sum(1)
    one_hot = (which.unsqueeze(1) == torch.arange(k, device=eps.device)).to(eps.dtype)  # [n, K]
    coefficients = one_hot.unsqueeze(2) * (eps[:, 1:1 + r].unsqueeze(1) * stds)  # [n, K, r]: the chosen row only
    spread = torch.matmul(coefficients.reshape(eps.shape[0], k * r), directions.reshape(k * r, d))
    residual = torch.matmul(one_hot, residual_stds.unsqueeze(1)) * eps[:, 1 + r:]
    return torch.matmul(one_hot, means) + spread + residual


class MixturePrior(NoisePrior):
    """A mixture of probabilistic PCA Gaussians fitted to the data: k-means splits the data into ``components``
    clusters; each has its own mean, its top ``rank`` principal directions with their stds, and isotropic
    noise carrying the rest of its variance; a sample picks a cluster by its share of the data.

    Why: with a standard normal prior the DCGAN's codes of noise vary along about 8 directions and f(z) covers
    part of the data (recall near 0.6); one Gaussian fitted to all the data gives blends of every class
    (docs/NAIGN.md). A mixture's samples are each a noisy, blurred member of one cluster, and f, trained to
    project noisy data back onto the data, turns them into sharp samples (docs/NAIGN.md, "A mixture prior").
    It is fitted to the training data, so its novelty is measured with every FID (``evaluate_digits``). The
    defaults, 64 components of rank 16, were chosen from a sweep on MNIST-5k (docs/NAIGN.md)."""

    kind = "mixture"

    def __init__(self, shape: Sequence[int], components: int = 64, rank: int = 16):
        super().__init__(shape)
        for name, value in (("components", components), ("rank", rank)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        dim = math.prod(self.shape)
        self.register_buffer("weights", torch.zeros(components))
        self.register_buffer("means", torch.zeros(components, dim))
        self.register_buffer("stds", torch.zeros(components, rank))
        self.register_buffer("directions", torch.zeros(components, rank, dim))
        self.register_buffer("residual_stds", torch.zeros(components))

    @property
    def noise_size(self) -> int:
        """Numbers of standard normal noise one sample takes: 1 (the component) + rank + D."""
        return 1 + self.stds.shape[1] + self.means.shape[1]

    def boundaries(self) -> torch.Tensor:
        return torch.cumsum(self.weights, 0)[:-1]

    @classmethod
    @torch.no_grad()
    def fit(cls, data: torch.Tensor, components: int = 64, rank: int = 16, seed: int = 0) -> "MixturePrior":
        """Fit to data [N, *shape] (N >= components); rank is capped at the data's dimension."""
        if not isinstance(data, torch.Tensor):
            raise TypeError(f"data must be a torch.Tensor, got {type(data).__name__}")
        if data.dim() < 2 or not data.dtype.is_floating_point or data.is_complex():
            raise ValueError(f"data must be a real float tensor [N, ...], got {data.dtype} {list(data.shape)}")
        if isinstance(components, bool) or not isinstance(components, int) or components < 1:
            raise ValueError(f"components must be a positive int, got {components!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        if data.shape[0] < components:
            raise ValueError(f"components must be at most the number of data samples ({data.shape[0]}), got "
                             f"{components}")
        flat = data.flatten(1).double()
        if not bool(torch.isfinite(flat).all()):
            raise ValueError("data contains NaN or inf")
        dim = flat.shape[1]
        prior = cls(tuple(data.shape[1:]), components, min(rank, dim))
        centers, assign = kmeans(flat, components, seed=seed)
        for j in range(components):
            members = flat[assign == j]
            count = members.shape[0]
            prior.weights[j] = count / flat.shape[0]
            prior.means[j] = (members.mean(0) if count else centers[j]).float()
            if count < 2:
                continue
            centered = members - members.mean(0)
            _, singular, rows = torch.linalg.svd(centered, full_matrices=False)
            variances = singular.square() / (count - 1)
            kept = min(prior.stds.shape[1], variances.shape[0])
            prior.stds[j, :kept] = variances[:kept].sqrt().float()
            prior.directions[j, :kept] = rows[:kept].float()
            rest = centered.square().sum() / (count - 1) - variances[:kept].sum()
            if dim > kept:
                prior.residual_stds[j] = float((rest.clamp_min(0) / (dim - kept)).sqrt())
        return prior.to(data.device)

    def sample(self, n, generator=None, device=None, dtype=torch.float32):
        n = _check_count(n)
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        if float(self.weights.sum()) == 0:
            raise RuntimeError("MixturePrior has no statistics: use MixturePrior.fit(data) or load a state_dict")
        device = torch.device(device) if device is not None else self._default_device()
        eps = self._standard_normal(n, generator, device, dtype, (self.noise_size,))
        buffers = [b.to(device=device, dtype=dtype) for b in (self.boundaries(), self.means, self.stds,
                                                              self.directions, self.residual_stds)]
        return mixture_from_noise(eps, *buffers).view(n, *self.shape)


_PRIORS = {"gaussian": GaussianPrior, "fourier": FourierPrior, "mixture": MixturePrior}


def build_prior(kind_or_config: str | dict, data: torch.Tensor | None = None,
                shape: Sequence[int] | None = None, state_dict: dict | None = None,
                components: int = 64, rank: int = 16) -> NoisePrior:
    """Make a prior from a kind ("gaussian" needs shape, "fourier" and "mixture" need data) or rebuild one.
    components and rank: a mixture's clusters and principal directions per cluster (fitting only: a rebuilt
    mixture takes its sizes from state_dict).

    Rebuild: ``build_prior(prior.to_config(), state_dict=prior.state_dict())``.
    """
    if isinstance(kind_or_config, dict):
        config = kind_or_config
        if set(config) != {"kind", "shape"}:
            raise ValueError(f"config must have keys 'kind' and 'shape', got {sorted(config)}")
        kind = config["kind"]
        if shape is not None and tuple(shape) != tuple(config["shape"]):
            raise ValueError(f"shape {list(shape)} contradicts config shape {config['shape']}")
        shape = config["shape"]
    elif isinstance(kind_or_config, str):
        kind = kind_or_config
    else:
        raise TypeError(f"kind_or_config must be a str or dict, got {type(kind_or_config).__name__}")
    if kind not in _PRIORS:
        raise ValueError(f"kind must be one of {list(PRIOR_KINDS)}, got {kind!r}")

    if kind in ("fourier", "mixture") and state_dict is None:
        if data is None:
            raise ValueError(f"data must be given to fit a {kind} prior (or pass state_dict to rebuild one)")
        prior = FourierPrior.fit(data) if kind == "fourier" else MixturePrior.fit(data, components, rank)
        if shape is not None and tuple(shape) != prior.shape:
            raise ValueError(f"shape {list(shape)} contradicts the data's per-sample shape {list(prior.shape)}")
        return prior
    if shape is None:
        if kind == "gaussian" and data is not None:
            shape = tuple(data.shape[1:])
        else:
            raise ValueError(f"shape must be given to build a {kind} prior")
    if kind == "mixture":
        if state_dict is None or not {"stds", "weights"} <= set(state_dict):
            raise ValueError("state_dict must hold a mixture prior's buffers (weights, means, stds, directions, "
                             "residual_stds) to rebuild one")
        components, rank = state_dict["stds"].shape
        prior = MixturePrior(shape, int(components), int(rank))
    else:
        prior = _PRIORS[kind](shape)
    if state_dict is not None:
        prior.load_state_dict(state_dict)
    return prior
