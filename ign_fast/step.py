"""One IGN training update for any nn.Module whose output has its input's shape.

mode="reference" is the plain version, written to be read and used as the oracle for the fast modes:
four calls in the order f_θ(x), f_θ(z), f_θ(sg f_θ(z)), f_θ'(f_θ(z)), each in the module's current mode.
θ' is not a deep copy: torch.func.functional_call runs the module on detached parameters (same values,
no parameter gradient) and on clones of its buffers, so BatchNorm in train mode uses batch statistics in
the copy's call too (as the paper's code does) without touching the model's running statistics.
"""
import torch
from torch.func import functional_call

from .objectives import IGNLoss
from .validation import check_finite, check_tensor

STEP_MODES = ("reference",)


def frozen_state(model):
    """θ': the model's parameters detached and its buffers cloned, for torch.func.functional_call."""
    state = {name: p.detach() for name, p in model.named_parameters()}
    state.update({name: b.clone() for name, b in model.named_buffers()})
    return state


def has_batch_coupling(model):
    """Whether one sample's output depends on the rest of its batch: BatchNorm using batch statistics
    (train mode, or no running statistics at all)."""
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats)
               for m in model.modules())


def check_step_inputs(x, z, check_values=True):
    check_tensor("x", x, min_dim=2)
    check_tensor("z", z, min_dim=2)
    if x.shape[0] == 0:
        raise ValueError("x must hold at least one sample, got an empty batch")
    if z.shape[0] == 0:
        raise ValueError("z must hold at least one sample, got an empty batch")
    if z.shape[1:] != x.shape[1:]:
        raise ValueError(f"z must have the per-sample shape of x {tuple(x.shape[1:])}, got {tuple(z.shape[1:])}")
    if z.dtype != x.dtype or z.device != x.device:
        raise ValueError(f"z must match x in dtype and device ({x.dtype}, {x.device}), got ({z.dtype}, {z.device})")
    if check_values:
        check_finite("x", x)
        check_finite("z", z)


def check_output(name, out, inp):
    if not isinstance(out, torch.Tensor) or out.shape != inp.shape:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model output must have its input's shape {tuple(inp.shape)}, got {shape} for {name}")
    return out


class IGNStep:
    """zero_grad, forward, backward, optimizer.step(); returns a dict of floats: loss, rec, idem, tight."""

    def __init__(self, model, optimizer, loss=None, mode="reference"):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if loss is None:
            loss = IGNLoss()
        if not isinstance(loss, IGNLoss):
            raise TypeError(f"loss must be an ign_fast.IGNLoss, got {type(loss).__name__}")
        if mode not in STEP_MODES:
            raise ValueError(f"mode must be one of {STEP_MODES}, got {mode!r}")
        self.model, self.optimizer, self.loss, self.mode = model, optimizer, loss, mode

    def forward_loss(self, x, z):
        """The objective's terms for one batch, with the graph attached: (total, rec, idem, tight)."""
        model = self.model
        fx = check_output("f(x)", model(x), x)
        fz = check_output("f(z)", model(z), z)
        ff_z = model(fz.detach())                            # f_θ(sg f_θ(z)): tight role, gradient into θ
        f_fz = functional_call(model, frozen_state(model), (fz,))  # f_θ'(f_θ(z)): idem role, into fz only
        return self.loss(x, fx, fz, f_fz, ff_z)

    def __call__(self, x, z):
        check_step_inputs(x, z)
        self.optimizer.zero_grad(set_to_none=True)
        total, rec, idem, tight = self.forward_loss(x, z)
        total.backward()
        self.optimizer.step()
        return {"loss": total.item(), "rec": rec.mean().item(), "idem": idem.mean().item(),
                "tight": tight.mean().item()}
