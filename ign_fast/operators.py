"""Known corruptions as linear measurement operators y = A(x), on batches of images [B, C, H, W] in [-1, 1].

The interface is the one of deepinv's physics operators (``A(x)`` and ``A_adjoint(y)``), so ``restore``
accepts a deepinv operator as it is, and these operators can be handed to code written for deepinv.
Beyond A and its adjoint each operator here offers:

- ``exact``: True when y is a noiseless measurement, so a restored x must satisfy A(x) = y exactly;
- ``consistent(x, y)``: the smallest change to x that makes A(x) = y, x + A^T (A A^T)^-1 (y - A x), in closed
  form (A A^T is diagonal for every operator here);
- ``initial(y)``: an image to start from (the known pixels with the missing ones at MISSING_FILL, a gray
  image copied to the channels, a bicubic upsampling), which is what "project" feeds to f;
- ``corrupted_image(y)``: the corrupted image as it is shown and scored ("PSNR before"): ``initial(y)``, except
  for a mask, whose missing pixels are black there (the issue's "square set to black").

Operators compose: ``a * b`` is "b, then a" (deepinv's convention); ``Compose(b, a)`` lists the same steps in
the order they are applied. A composition without a closed-form pseudo-inverse falls back to conjugate
gradients on A A^T (``consistent_cg``), as any foreign linear operator does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .validation import check_positive_int, check_tensor

# ITU-R BT.601 luma weights (deepinv's Decolorize uses the same); they sum to 1, so a gray image copied to the
# three channels is exactly consistent with its own measurement.
LUMA = (0.299, 0.587, 0.114)

# The value a missing pixel takes in what f is fed (Mask.initial, and the training term's masks in
# ign_fast/corruptions.py). Not black: the digits' background is black (-1), so a square filled with black is
# indistinguishable from empty background and f cannot know where the hole is; mid-gray 0 covers no digit
# pixel in bulk, so f can learn to find and fill it (docs/RESTORE.md has the measurements).
MISSING_FILL = 0.0
# The value a missing pixel shows in the corrupted image the benchmark scores (corrupted_image).
SHOWN_FILL = -1.0


def _shape(t):
    return list(t.shape)


class Operator:
    """Base class: subclasses define A, A_adjoint, ``expects`` and, where they can, a closed-form consistency."""

    exact = True          # noiseless measurements: restore keeps A(x) = y
    linear = True
    expects = "x: [B, C, H, W]"

    def A(self, x):
        raise NotImplementedError

    def A_adjoint(self, y):
        raise NotImplementedError

    def __call__(self, x):
        return self.A(x)

    def __mul__(self, other):
        """a * b: apply b, then a (deepinv's composition order)."""
        return Compose(other, self)

    def initial(self, y):
        return self.consistent(torch.zeros_like(self.A_adjoint(y)), y)

    def corrupted_image(self, y):
        return self.initial(y)

    def consistent(self, x, y):
        return consistent_cg(self, x, y)

    def _check_x(self, x, ok, why=None):
        check_tensor("x", x)
        if not ok:
            raise ValueError(f"{self!r}.A expects {self.expects}{'' if why is None else ' ' + why}, "
                             f"got x of shape {_shape(x)}")

    def _check_y(self, y, ok):
        check_tensor("y", y)
        if not ok:
            raise ValueError(f"{self!r}.A_adjoint expects y of the shape A(x) has ({self.expects_y}), "
                             f"got y of shape {_shape(y)}")


class Identity(Operator):
    """y = x (+ noise): denoising. sigma is the noise level of y in [-1, 1] units; with sigma > 0 the measurement
    is not exact, so restore does not put y back (that would put the noise back)."""

    expects = "x: [B, C, H, W] (any shape, batch first)"
    expects_y = "the shape of x"

    def __init__(self, sigma=0.0):
        sigma = float(sigma)
        if not sigma >= 0.0 or sigma == float("inf"):
            raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
        self.sigma = sigma
        self.exact = sigma == 0.0

    def __repr__(self):
        return f"Identity(sigma={self.sigma:g})"

    def A(self, x):
        self._check_x(x, x.dim() >= 1)
        return x

    def A_adjoint(self, y):
        self._check_y(y, y.dim() >= 1)
        return y

    def initial(self, y):
        return y

    def consistent(self, x, y):
        return y.to(x.dtype).expand_as(x) if self.exact else x


class Mask(Operator):
    """Inpainting: y = known * x, with known = 1 for an observed pixel and 0 for a missing one (deepinv's
    Inpainting convention: a missing pixel reads 0 in y). known: [H, W], [C, H, W], [1 or B, C, H, W] or any
    shape that broadcasts to x; only 0 and 1 (a soft mask has no exact consistency to keep)."""

    expects_y = "the shape of x, 0 where unknown"
    # restore(method="auto") for a model trained with the term's masks (taught "mask"): f fills the gray hole in
    # one pass; 2 alternations with the known pixels gained 0.3-0.5 dB over one, 40 lost 0.5 dB, and "latent"
    # from noise lost 0.6 dB in 100x the time (docs/RESTORE.md)
    taught_kind = "mask"
    taught_auto = ("consistent", 2)

    def __init__(self, known, fill=MISSING_FILL):
        check_tensor("known", known, floating=False)
        if known.dim() < 2:
            raise ValueError(f"known must be a mask of at least [H, W], got shape {_shape(known)}")
        known = known.float()
        if not bool(((known == 0) | (known == 1)).all()):
            raise ValueError("known must hold only 0 (missing) and 1 (observed)")
        self.known = known
        # The value missing pixels take in initial(y), what "project" and "consistent" feed f: MISSING_FILL
        # (mid-gray) by default, which a model trained with the restoration term recognises as a hole.
        try:
            self.fill = float(fill)
        except (TypeError, ValueError):
            self.fill = float("nan")
        if not -1.0 <= self.fill <= 1.0:
            raise ValueError(f"fill must be a number in [-1, 1] (the images' range), got {fill!r}")
        self.expects = f"x: [B, C, H, W] that the mask of shape {_shape(known)} broadcasts to"

    def __repr__(self):
        return f"Mask(known of shape {_shape(self.known)})"

    def _mask_for(self, t, check):
        m = self.known.to(t.device)
        ok = t.dim() >= m.dim() and t.dim() >= 2
        if ok:
            try:
                ok = torch.broadcast_shapes(m.shape, t.shape) == t.shape
            except RuntimeError:
                ok = False
        check(t, ok)
        return m.to(t.dtype) if t.dtype.is_floating_point else m

    def A(self, x):
        return x * self._mask_for(x, self._check_x)

    def A_adjoint(self, y):
        return y * self._mask_for(y, self._check_y)

    def initial(self, y):
        return self._filled(y, self.fill)

    def corrupted_image(self, y):
        return self._filled(y, SHOWN_FILL)

    def _filled(self, y, value):
        m = self._mask_for(y, self._check_y)
        return y * m + value * (1 - m)

    def consistent(self, x, y):
        # A A^T = diag(known) and known is 0/1: the pseudo-inverse puts the observed pixels back.
        m = self._mask_for(x, self._check_x)
        return x * (1 - m) + y.to(x.dtype) * m


class Grayscale(Operator):
    """Colour to luminance: y = sum_c w_c x_c, [B, 3, H, W] -> [B, 1, H, W], w = ITU-R BT.601 luma weights."""

    expects = "x: [B, 3, H, W] (RGB)"
    expects_y = "[B, 1, H, W]"
    # restore(method="auto") for a model trained with the term's gray corruption: f once (docs/RESTORE.md)
    taught_kind = "gray"
    taught_auto = ("project", 1)

    def __init__(self, weights=LUMA):
        w = torch.as_tensor(weights, dtype=torch.float32)
        if w.shape != (3,):
            raise ValueError(f"weights must be 3 numbers (R, G, B), got shape {_shape(w)}")
        self.weights = w

    def __repr__(self):
        return "Grayscale()"

    def _w(self, t):
        return self.weights.to(t.device, t.dtype).view(1, 3, 1, 1)

    def A(self, x):
        self._check_x(x, x.dim() == 4 and x.shape[1] == 3)
        return (x * self._w(x)).sum(1, keepdim=True)

    def A_adjoint(self, y):
        self._check_y(y, y.dim() == 4 and y.shape[1] == 1)
        return y * self._w(y)

    def initial(self, y):
        # The gray image in every channel: exactly consistent when the weights sum to 1 (they do for LUMA).
        return self.consistent(y.expand(-1, 3, -1, -1), y)

    def consistent(self, x, y):
        # A A^T = |w|^2: spread the luminance residual over the channels in proportion to their weights.
        w = self._w(x)
        return x + w * (y.to(x.dtype) - self.A(x)) / w.square().sum()


class Downsample(Operator):
    """Area (box) downsampling by an integer factor: y = mean over each factor x factor block,
    [B, C, H, W] -> [B, C, H / factor, W / factor]."""

    expects_y = "[B, C, H / factor, W / factor]"
    # restore(method="auto") uses "project" here: on the demo model f once (then the consistency) gave 24.4 dB
    # for x2, "latent" 22.5 dB at its default budget (docs/RESTORE.md).
    auto_method = "project"

    def __init__(self, factor):
        self.factor = check_positive_int("factor", factor)
        self.expects = f"x: [B, C, H, W] with H and W divisible by {self.factor}"

    def __repr__(self):
        return f"Downsample({self.factor})"

    def A(self, x):
        k = self.factor
        self._check_x(x, x.dim() == 4 and x.shape[-2] % k == 0 and x.shape[-1] % k == 0)
        return F.avg_pool2d(x, k)

    def A_adjoint(self, y):
        self._check_y(y, y.dim() == 4)
        k = self.factor
        return F.interpolate(y, scale_factor=k, mode="nearest") / (k * k)

    def initial(self, y):
        self._check_y(y, y.dim() == 4)
        up = F.interpolate(y, scale_factor=self.factor, mode="bicubic", align_corners=False)
        return self.consistent(up, y)

    def consistent(self, x, y):
        # A A^T = I / factor^2, so x + factor^2 A^T r adds the residual r copied over each block.
        return x + F.interpolate(y.to(x.dtype) - self.A(x), scale_factor=self.factor, mode="nearest")


class Compose(Operator):
    """Operators applied in the order given: Compose(Downsample(2), Grayscale()) downsamples, then makes gray."""

    def __init__(self, *operators):
        if not operators:
            raise ValueError("operators must name at least one operator")
        for i, op in enumerate(operators):
            if not (callable(getattr(op, "A", None)) and callable(getattr(op, "A_adjoint", None))):
                raise TypeError(f"operators[{i}] must have A and A_adjoint, got {type(op).__name__}")
        flat = []
        for op in operators:
            flat += list(op.operators) if isinstance(op, Compose) else [op]
        self.operators = tuple(flat)
        self.exact = all(getattr(op, "exact", True) for op in flat)
        self.linear = all(getattr(op, "linear", True) for op in flat)
        self.expects = f"what {self.operators[0]!r} expects"

    def __repr__(self):
        return f"Compose({', '.join(map(repr, self.operators))})"

    def A(self, x):
        for op in self.operators:
            x = op.A(x)
        return x

    def A_adjoint(self, y):
        for op in reversed(self.operators):
            y = op.A_adjoint(y)
        return y

    def initial(self, y):
        x = y
        for op in reversed(self.operators):
            x = op.initial(x) if hasattr(op, "initial") else op.A_adjoint(x)
        return self.consistent(x, y)


class Edges(Operator):
    """Sketch: the edge map of `ign-fast project --corruption sketch` (Sobel magnitude of the gray image over
    its per-image maximum, thresholded at `threshold`, as -1/1 in every channel). It is NOT linear: it has no
    adjoint and no exact consistency (a restored digit is not its own edge map), so only "project" and
    "latent" use it; "latent" fits a smooth version of the threshold (a sigmoid `softness` wide) so that the
    edges of f(u) can be matched by gradient descent."""

    linear = False
    exact = False
    expects = "x: [B, C, H, W]"
    expects_y = "the shape of x"

    def __init__(self, threshold=0.35, softness=0.05):
        self.threshold = float(threshold)
        self.softness = float(softness)
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
        if not self.softness >= 0.0:
            raise ValueError(f"softness must be >= 0, got {softness!r}")

    def __repr__(self):
        return f"Edges(threshold={self.threshold:g}, softness={self.softness:g})"

    def _magnitude(self, x):
        self._check_x(x, x.dim() == 4)
        gray = x.mean(dim=1, keepdim=True)
        kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=x.dtype,
                          device=x.device).view(1, 1, 3, 3)
        gx = F.conv2d(gray, kx, padding=1)
        gy = F.conv2d(gray, kx.transpose(2, 3), padding=1)
        # + tiny inside the root: its gradient at a flat pixel would be inf otherwise
        edges = (gx.square() + gy.square() + 1e-12).sqrt()
        return edges / edges.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)

    def A(self, x):
        level = self._magnitude(x) - self.threshold
        if self.softness == 0.0:
            edges = (level > 0).to(x.dtype)
        else:
            edges = torch.sigmoid(level / self.softness)
        return (edges * 2 - 1).expand_as(x)

    def hard(self, x):
        """The binary edge map (the sketch corruption itself)."""
        level = self._magnitude(x) - self.threshold
        return ((level > 0).to(x.dtype) * 2 - 1).expand_as(x).contiguous()

    def A_adjoint(self, y):
        raise NotImplementedError("Edges is nonlinear: it has no adjoint (use method 'project' or 'latent')")

    def initial(self, y):
        return y

    def consistent(self, x, y):
        return x


def consistent_cg(operator, x, y, iterations=30, tol=1e-6):
    """x + A^T z with A A^T z = y - A x solved by conjugate gradients per sample: the nearest x with A x = y
    for any linear operator (a composition, a deepinv operator). A A^T is symmetric positive (semi)definite;
    CG on it needs only A and A_adjoint."""
    r0 = y.to(x.dtype) - operator.A(x)
    z = torch.zeros_like(r0)
    r, p = r0.clone(), r0.clone()
    dims = tuple(range(1, r0.dim()))
    rr = r.square().sum(dims, keepdim=True)
    stop = tol * tol * rr.clamp_min(1e-30)
    for _ in range(iterations):
        ap = operator.A(operator.A_adjoint(p))
        pap = (p * ap).sum(dims, keepdim=True)
        alpha = torch.where(pap > 0, rr / pap.clamp_min(1e-30), torch.zeros_like(pap))
        z = z + alpha * p
        r = r - alpha * ap
        rr_new = r.square().sum(dims, keepdim=True)
        if bool((rr_new <= stop).all()):
            break
        p = r + (rr_new / rr.clamp_min(1e-30)) * p
        rr = rr_new
    return x + operator.A_adjoint(z)


def is_operator(obj):
    return callable(getattr(obj, "A", None)) and callable(getattr(obj, "A_adjoint", None))


def random_square_mask(n, size, side_range=(10, 14), channels=1, generator=None):
    """known [n, channels, size, size]: 1 everywhere but one random square per image (side drawn from
    side_range, inclusive) - the issue's masked-digit corruption."""
    low, high = side_range
    known = torch.ones(n, channels, size, size)
    sides = torch.randint(low, high + 1, (n,), generator=generator)
    for i in range(n):
        s = int(sides[i])
        top = int(torch.randint(0, size - s + 1, (1,), generator=generator))
        left = int(torch.randint(0, size - s + 1, (1,), generator=generator))
        known[i, :, top:top + s, left:left + s] = 0
    return known
