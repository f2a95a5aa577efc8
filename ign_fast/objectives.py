"""The IGN objective (Shocher et al., ICLR 2024, eq. 6-9 with the clamp of the authors' code).

With d(a, b)_i the per-sample mean |a-b| (l1) or (a-b)^2 (l2), θ' a frozen copy of θ and sg stop-gradient:
  rec_i   = d(f_θ(x), x)_i
  idem_i  = d(f_θ'(f_θ(z)), f_θ(z))_i                 reaches θ only through f_θ(z)
  tight_i = -d(f_θ(sg f_θ(z)), sg f_θ(z))_i            reaches θ only through the outer call
  clamp (ratio a):  tight_i = tanh(tight_i / (a·rec_i)) · a·rec_i      (rec_i not detached)
  total = λr·mean(rec) + λi·mean(idem) + λt·mean(tight)
"""
import torch

from . import ops
from .validation import check_distance_kind, check_nonnegative_float, check_same, check_tensor

# Below this a·rec_i is treated as 0, where the clamp takes its limit sign(tight_i)·a·rec_i: value 0 and
# d/drec = -a, finite. Above it t/(a·rec) and its square stay representable in float32.
CLAMP_SCALE_EPS = 1e-12
# tanh(±20) is ±1 to double precision; clipping its argument keeps huge ratios from overflowing backward.
CLAMP_ARG_LIMIT = 20.0


def clamp_tight(tight, rec, ratio):
    """tanh(tight / (ratio·rec)) · ratio·rec, defined (and finite in value and gradient) at rec = 0."""
    scale = ratio * rec
    usable = scale > CLAMP_SCALE_EPS
    safe_scale = torch.where(usable, scale, torch.ones_like(scale))
    smooth = torch.tanh((tight / safe_scale).clamp(-CLAMP_ARG_LIMIT, CLAMP_ARG_LIMIT)) * safe_scale
    return torch.where(usable, smooth, torch.sign(tight).detach() * scale)


class IGNLoss(torch.nn.Module):
    """The IGN objective. Defaults are the paper's code as its replications read it.

    loss(x, fx, fz, f_fz, ff_z) -> (total, rec, idem, tight): total is 0-dim, the others per sample [B].
    f_fz = f_θ'(f_θ(z)) carries the idem role (its gradient flows into fz); ff_z = f_θ(sg f_θ(z)) carries
    the tight role (its gradient flows into θ); the two may be the same tensor value.
    """

    def __init__(self, distance="l1", lambda_rec=20.0, lambda_idem=20.0, lambda_tight=2.5, tight_clamp_ratio=1.5):
        super().__init__()
        self.distance = check_distance_kind("distance", distance)
        self.lambda_rec = check_nonnegative_float("lambda_rec", lambda_rec)
        self.lambda_idem = check_nonnegative_float("lambda_idem", lambda_idem)
        self.lambda_tight = check_nonnegative_float("lambda_tight", lambda_tight)
        if tight_clamp_ratio is not None:
            tight_clamp_ratio = check_nonnegative_float("tight_clamp_ratio", tight_clamp_ratio)
            if tight_clamp_ratio == 0:
                raise ValueError("tight_clamp_ratio must be > 0 or None (no clamp), got 0")
        self.tight_clamp_ratio = tight_clamp_ratio

    def config(self):
        return {"distance": self.distance, "lambda_rec": self.lambda_rec, "lambda_idem": self.lambda_idem,
                "lambda_tight": self.lambda_tight, "tight_clamp_ratio": self.tight_clamp_ratio}

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items())

    def forward(self, x, fx, fz, f_fz, ff_z):
        check_tensor("x", x)
        check_same("fx", fx, "x", x)
        check_tensor("fz", fz)
        if fz.shape[1:] != x.shape[1:]:
            raise ValueError(f"fz must have per-sample shape {tuple(x.shape[1:])} like x, got {tuple(fz.shape)}")
        check_same("f_fz", f_fz, "fz", fz)
        check_same("ff_z", ff_z, "fz", fz)
        d = self.distance
        rec = ops.per_sample_distance(fx, x, d)
        idem = ops.per_sample_distance(f_fz, fz, d)
        tight = -ops.per_sample_distance(ff_z, fz.detach(), d)
        if self.tight_clamp_ratio is not None:
            tight = clamp_tight(tight, rec, self.tight_clamp_ratio)
        total = self.lambda_rec * rec.mean() + self.lambda_idem * idem.mean() + self.lambda_tight * tight.mean()
        return total, rec, idem, tight
