"""The IGN objective (Shocher et al., ICLR 2024, eq. 6-9 with the clamp of the authors' code).

With d(a, b)_i the per-sample mean |a-b| (l1) or (a-b)^2 (l2), θ' a frozen copy of θ and sg stop-gradient:
  rec_i   = d(f_θ(x), x)_i
  idem_i  = d(f_θ'(f_θ(z)), f_θ(z))_i                 reaches θ only through f_θ(z)
  tight_i = -d(f_θ(sg f_θ(z)), sg f_θ(z))_i            reaches θ only through the outer call
  clamp (ratio a):  tight_i = tanh(tight_i / (a·rec_i)) · a·rec_i      (rec_i not detached)
  total = λr·mean(rec) + λi·mean(idem) + λt·mean(tight)

Optional terms IGNStep adds, off by default (the paper's objective is the four calls and forward() below):
  restore_i = d_c(f(c(x_i)), x_i)                      f undoes a known corruption c (issue 13)
  imle_i    = d(f_θ(z_j*(i)), x_i),  j*(i) = argmin_j d(sg f_θ(z_j), x_i)
            an IGN + IMLE hybrid (issue 14): every data point pulls the nearest of the batch's own f(z) onto
            itself, as NAIGN does with its candidate pool. It costs no extra call of f (f(z) is made anyway),
            and it gives the collapse the tightness term drives a counterweight: a dropped mode leaves its
            data points far from every f(z), and they pull. docs/IGN.md measures it.
"""
import torch

from . import ops, reference
from .validation import check_clamp_ratio, check_distance_kind, check_nonnegative_float

# The clamp and its rec = 0 limit (CLAMP_SCALE_EPS, CLAMP_ARG_LIMIT) live in reference.py, beside the rest of
# the objective's plain-PyTorch form (reference.ign_loss); the kernels implement exactly those semantics.
CLAMP_SCALE_EPS = reference.CLAMP_SCALE_EPS
CLAMP_ARG_LIMIT = reference.CLAMP_ARG_LIMIT
clamp_tight = reference.clamp_tight


class IGNLoss(torch.nn.Module):
    """The IGN objective. Defaults are the paper's code as its replications read it.

    loss(x, fx, fz, f_fz, ff_z) -> (total, rec, idem, tight): total is 0-dim, the others per sample [B].
    f_fz = f_θ'(f_θ(z)) carries the idem role (its gradient flows into fz); ff_z = f_θ(sg f_θ(z)) carries
    the tight role (its gradient flows into θ); the two may be the same tensor value.
    """

    def __init__(self, distance="l1", lambda_rec=20.0, lambda_idem=20.0, lambda_tight=2.5, tight_clamp_ratio=1.5,
                 lambda_restore=0.0, restore_distance=None, lambda_imle=0.0):
        super().__init__()
        self.distance = check_distance_kind("distance", distance)
        self.lambda_rec = check_nonnegative_float("lambda_rec", lambda_rec)
        self.lambda_idem = check_nonnegative_float("lambda_idem", lambda_idem)
        self.lambda_tight = check_nonnegative_float("lambda_tight", lambda_tight)
        self.tight_clamp_ratio = check_clamp_ratio(tight_clamp_ratio)
        # The restoration term λ_c · mean d_c(f(c(x)), x) (issue 13), added by IGNStep, which owns the corruption
        # c: not part of forward(), whose fused kernel is the paper's objective. d_c: restore_distance or distance.
        self.lambda_restore = check_nonnegative_float("lambda_restore", lambda_restore)
        self.restore_distance = None if restore_distance is None else check_distance_kind("restore_distance",
                                                                                         restore_distance)
        # The IMLE pull λ_imle · mean d(f(z_j*), x) on the batch's own f(z) (the module docstring), added by
        # IGNStep like the restoration term; 0 is the paper's objective.
        self.lambda_imle = check_nonnegative_float("lambda_imle", lambda_imle)

    def config(self):
        return {"distance": self.distance, "lambda_rec": self.lambda_rec, "lambda_idem": self.lambda_idem,
                "lambda_tight": self.lambda_tight, "tight_clamp_ratio": self.tight_clamp_ratio,
                "lambda_restore": self.lambda_restore, "restore_distance": self.restore_distance,
                "lambda_imle": self.lambda_imle}

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items())

    def forward(self, x, fx, fz, f_fz, ff_z):
        # one fused pass (ign_fast::ign_loss) where a kernel exists, reference.ign_loss otherwise; ops.ign_loss
        # checks the tensors (shapes, dtypes, devices) with the same one-line errors
        return ops.ign_loss(x, fx, fz, f_fz, ff_z, self.distance, self.lambda_rec, self.lambda_idem,
                            self.lambda_tight, self.tight_clamp_ratio)
