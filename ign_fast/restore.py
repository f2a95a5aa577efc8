"""Restoration with a trained projector f when the corruption is known: y = A(x) for a measurement operator A
(ign_fast.operators, or any object with A and A_adjoint such as a deepinv physics operator).

Methods (all batched, deterministic for a seed):

- "project":    f^steps(x0), x0 = an image built from y (operator.initial): today's plain projection;
- "consistent": x <- C(f(x)) repeated `steps` times from x0, where C(x) is the nearest image with A(x) = y
                (put the known pixels back, add the upsampled residual, spread the luminance residual);
- "latent":     optimise the input u of f with Adam so that A(f(u)) matches y, from several starts at once
                (prior noise), keep the start with the smallest measurement error per image, then C;
- "auto":       the best measured (docs/RESTORE.md): for a model trained to undo this corruption (the
                restoration term; `taught` names the kinds), the operator's `taught_auto` (Mask: "consistent"
                x 2, Grayscale: "project"); else the operator's `auto_method` where it names one (Downsample:
                "project"), else "latent" for exact or nonlinear measurements (Mask, Edges, Grayscale) and
                "project" for noisy ones (putting y back would put the noise back; "latent" would fit it).

Every result of an exact operator satisfies A(x) = y (to rounding), whatever f returned.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch.func import functional_call

from .operators import is_operator
from .validation import check_finite, check_positive_float, check_positive_int, check_tensor

METHODS = ("auto", "project", "consistent", "latent")
# Defaults chosen on the demo model (docs/RESTORE.md): 100 Adam iterations x 2 starts restore 256 masked digits in
# 26 s on one core; 150 x 4 gained 0.26 dB for 3x the time.
DEFAULT_STEPS = {"project": 1, "consistent": 40, "latent": 100}
DEFAULT_STARTS = 2
DEFAULT_LR = 0.2
DEFAULT_COMBINE = "best"
COMBINES = ("mean", "best")


def differentiable_f(model):
    """x -> f(x) with gradients to x (not to the weights), under ign_fast's inference normalisation policy:
    BatchNorm with batch statistics and its running statistics untouched, other models in eval mode."""
    from .inference import uses_batch_statistics

    batch_stats = uses_batch_statistics(model)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(x):
        was_training = model.training
        model.train(batch_stats)
        try:
            if batch_stats:  # cloned buffers take the running-statistics updates and are thrown away
                state = dict(params, **{k: v.clone() for k, v in model.named_buffers()})
                return functional_call(model, state, (x,))
            return functional_call(model, params, (x,))
        finally:
            model.train(was_training)

    return f


def _check_operator(operator):
    if not is_operator(operator):
        raise TypeError(f"operator must have A(x) and A_adjoint(y) methods (ign_fast.operators or a deepinv "
                        f"physics operator), got {type(operator).__name__}")
    return operator


def _initial(operator, y):
    if hasattr(operator, "initial"):
        return operator.initial(y)
    if callable(getattr(operator, "A_dagger", None)):  # deepinv: the least-squares solution
        return operator.A_dagger(y)
    return consistency(operator, operator.A_adjoint(y), y)


def is_exact(operator):
    """Noiseless measurements (keep A x = y)? Ours say so; a deepinv operator is exact when its noise model
    is the zero noise (deepinv's default) and inexact when it has a positive sigma."""
    if hasattr(operator, "exact"):
        return bool(operator.exact)
    noise = getattr(operator, "noise_model", None)
    sigma = getattr(noise, "sigma", 0.0)
    try:
        return float(sigma) == 0.0
    except (TypeError, ValueError):
        return False


def consistency(operator, x, y):
    """The nearest image to x with A(x) = y: the operator's closed form, else conjugate gradients."""
    if hasattr(operator, "consistent"):
        return operator.consistent(x, y)
    from .operators import consistent_cg

    return consistent_cg(operator, x, y)


def _measurement_error(operator, x, y):
    r = operator.A(x).float() - y.float()
    return r.square().flatten(1).mean(1)


def _autocast(device, amp):
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "none"
    if amp == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if amp == "none":
        return contextlib.nullcontext()
    raise ValueError(f"amp must be 'auto', 'bf16' or 'none', got {amp!r}")


def _adam(u, f, y, operator, steps, lr, amp, b, sphere):
    """Adam on u [k * B, ...] (k starts of the B images) for `steps` iterations. The learning rate is
    cosine-decayed to 0 so the last iterations settle instead of jittering around the fit; with `sphere` each
    u is kept at the norm it started with (prior noise lives near a sphere, and f was trained on noise there:
    free u grew to 1.2-2.5x that norm and fitted the known pixels with less digit-like images, -0.2 dB)."""
    radius = u.flatten(1).norm(dim=1).view(-1, *([1] * (u.dim() - 1)))
    u = u.detach().clone().requires_grad_(True)
    optimiser = torch.optim.Adam([u], lr=lr)
    for i in range(steps):
        for group in optimiser.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * i / steps))
        optimiser.zero_grad(set_to_none=True)
        with _autocast(y.device, amp):
            out = f(u)
        # Each start measured with the operator as given: a per-image mask [B, ...] applies to each block of B.
        # Summed over images so an image's gradient does not shrink with the batch size.
        loss = sum((operator.A(o.float()) - y).square().flatten(1).mean(1).sum() for o in out.split(b))
        loss.backward()
        optimiser.step()
        if sphere:
            with torch.no_grad():
                u.mul_(radius / u.flatten(1).norm(dim=1).view_as(radius).clamp_min(1e-12))
    return u.detach()


def _latent(f, y, operator, x0, steps, starts, lr, noise, seed, amp, combine, sphere):
    """Adam on the inputs u of f, all starts of all images in one batch [starts * B]: every start is prior
    noise (starting from the corrupted image itself, f reproduced the corruption: a masked digit is close to
    f's range, so the measurement fit was nearly perfect and the hole stayed). Returns, per image, the f(u) with
    the smallest measurement error (combine="best") or the mean of the starts' f(u) (combine="mean")."""
    b = y.shape[0]
    generator = torch.Generator().manual_seed(seed)
    u = noise(starts * b, generator).to(x0.device, torch.float32)
    if tuple(u.shape[1:]) != tuple(x0.shape[1:]):
        raise ValueError(f"noise must give inputs of f's input shape {list(x0.shape[1:])}, got {list(u.shape[1:])}")
    u = _adam(u, f, y, operator, steps, lr, amp, b, sphere)
    with torch.no_grad():
        out = f(u).float()
        candidates = out.view(starts, b, *out.shape[1:])
        if combine == "mean":
            return candidates.mean(0)
        errors = torch.stack([_measurement_error(operator, o, y) for o in candidates])  # [starts, B]
        return candidates[errors.argmin(0), torch.arange(b, device=errors.device)]


def auto_method(operator, taught=()):
    """(method, steps or None) that method="auto" runs for this operator and a model taught these corruptions."""
    kind = getattr(operator, "taught_kind", None)
    if kind is not None and kind in taught:
        return getattr(operator, "taught_auto")
    if getattr(operator, "auto_method", None):
        return operator.auto_method, None
    # Noisy linear measurements (Identity with sigma > 0): one projection; exact ones and nonlinear ones (Edges):
    # latent, the best measured on each (docs/RESTORE.md).
    exact = is_exact(operator)
    return ("latent" if exact or not getattr(operator, "linear", True) else "project"), None


def restore(f, y, operator, method="auto", steps=None, seed=0, starts=None, lr=None, noise=None, amp="auto",
            combine=None, sphere=True, taught=()):
    """Restore images from measurements y = A(x) with the projector f.

    f: x -> f(x), differentiable in x for "latent" (differentiable_f(model) gives one). y: measurements,
    batch first, as operator.A returns them. operator: an object with A and A_adjoint. method: "auto",
    "project", "consistent" or "latent". steps: f applications ("project"), alternations ("consistent") or
    Adam iterations ("latent"); default DEFAULT_STEPS. starts: "latent" starts per image (x0 and starts - 1
    noise draws). noise: (n, generator) -> n prior samples, the inputs f was trained on (default standard
    normal of x0's shape). amp: "auto" (bf16 autocast for the "latent" optimisation on CUDA), "bf16", "none".
    taught: the corruption kinds f was trained to undo ("mask", "noise", "gray"; Projector.restore passes the
    run's), which "auto" uses. Returns restored images [B, ...] in float32.
    """
    operator = _check_operator(operator)
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    check_tensor("y", y)
    check_finite("y", y)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    exact = is_exact(operator)
    if isinstance(taught, str) or not all(isinstance(k, str) for k in taught):
        raise ValueError(f"taught must be a sequence of corruption names such as ('mask', 'noise'), got {taught!r}")
    auto_steps = None
    if method == "auto":
        # An operator may name its own measured best (Downsample: f once beat 100 Adam iterations x 2 starts)
        method, auto_steps = auto_method(operator, taught)
    if steps is None:
        steps = auto_steps or DEFAULT_STEPS[method]
    else:
        steps = check_positive_int("steps", steps)
    starts = DEFAULT_STARTS if starts is None else check_positive_int("starts", starts)
    lr = DEFAULT_LR if lr is None else check_positive_float("lr", lr)
    combine = DEFAULT_COMBINE if combine is None else combine
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {', '.join(COMBINES)}, got {combine!r}")
    y = y.float()
    with torch.no_grad():
        x = _initial(operator, y).float()
    if noise is None:
        def noise(n, generator):
            return torch.randn((n, *x.shape[1:]), generator=generator)

    if method == "project":
        with torch.no_grad():
            for _ in range(steps):
                x = f(x).float()
    elif method == "consistent":
        with torch.no_grad():
            for _ in range(steps):
                x = f(x).float()
                if exact:
                    x = consistency(operator, x, y)
    else:
        with torch.enable_grad():
            x = _latent(f, y, operator, x, steps, starts, lr, noise, seed, amp, combine, sphere)
    if exact:
        with torch.no_grad():
            x = consistency(operator, x, y)
    return x.detach()


def restore_with_projector(projector, y, operator, method="auto", steps=None, seed=0, **options):
    """restore() with a Projector's f and prior (Projector.restore calls this)."""
    if hasattr(projector, "model"):
        f = differentiable_f(projector.model)
        device = next(iter(projector.model.parameters()), torch.empty(0)).device
    elif hasattr(projector, "module"):  # TorchScript: module(x, steps) is f^steps and differentiable in x
        module = projector.module
        device = next(iter(module.parameters()), torch.empty(0)).device

        def f(x):
            return module(x, 1)
    else:
        raise ValueError("this projector has neither a model nor a TorchScript module to restore with")
    options.setdefault("taught", getattr(projector, "taught", ()))
    if "noise" not in options and projector.prior_kind != "none":
        training_prior = getattr(projector, "training_prior", None)

        def noise(n, generator):
            # Projector.noise takes an int seed (the same draw in Python, TorchScript and C++): one per call.
            # A run's own training noise where the projector knows it (a run or checkpoint folder), not the prior
            # it samples from: f was trained on that noise, and starts drawn from a mixture prior (rough digits,
            # not a sphere) restore masked digits 0.5 dB worse. An exported file carries only the latter.
            seed = int(torch.randint(2 ** 62, (1,), generator=generator))
            if training_prior is None:
                return projector.noise(n, seed=seed)
            return training_prior.sample(n, generator=torch.Generator().manual_seed(seed)).to(device)

        options["noise"] = noise
    check_tensor("y", y)
    return restore(f, y.to(device), operator, method=method, steps=steps, seed=seed, **options)
