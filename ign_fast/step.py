"""One IGN training update for any nn.Module whose output has its input's shape.

mode="fused" (ign_fast/fused_step.py) computes f(x) and f(z) in one call where the model has no batch
coupling, f(f(z)) once, and copies no weights; its gradients equal the reference's. mode="graph" captures
the fused step whole (forward, backward, optimizer update) as a CUDA graph (ign_fast/graph_step.py).

mode="reference" is the plain version, written to be read and used as the oracle for the fast modes:
four calls in the order f_θ(x), f_θ(z), f_θ(sg f_θ(z)), f_θ'(f_θ(z)), each in the module's current mode.
θ' is not a deep copy: torch.func.functional_call runs the module on detached parameters (same values,
no parameter gradient) and on clones of its buffers, so BatchNorm in train mode uses batch statistics in
the copy's call too (as the paper's code does) without touching the model's running statistics.

Non-finite steps: with skip_nonfinite (the default) a step whose loss is NaN or inf leaves the weights and the
optimizer's state untouched; `last_skipped` says whether the last call did. The loss is read as a float before
optimizer.step() instead of after it, so this costs no extra host sync. A replayed CUDA graph (mode="graph")
makes the same decision on the device and reports it the same way (graph_step.py).

Data parallel: `grad_sync`, when set (ign_fast/distributed.py), runs after backward and before the update
and averages the gradients and loss terms across ranks; it is the only place gradients are reduced.
"""
import math

import torch
from torch.func import functional_call

from . import ops
from .graph_step import set_capturable
from .objectives import IGNLoss
from .validation import check_finite, check_tensor

STEP_MODES = ("reference", "fused", "graph")


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


def check_step_inputs(x, z, check_values=True, z_name="z"):
    check_tensor("x", x, min_dim=2)
    check_tensor(z_name, z, min_dim=2)
    if x.shape[0] == 0:
        raise ValueError("x must hold at least one sample, got an empty batch")
    if z.shape[0] == 0:
        raise ValueError(f"{z_name} must hold at least one sample, got an empty batch")
    if z.shape[1:] != x.shape[1:]:
        raise ValueError(f"{z_name} must have the per-sample shape of x {tuple(x.shape[1:])}, got "
                         f"{tuple(z.shape[1:])}")
    if z.dtype != x.dtype or z.device != x.device:
        raise ValueError(f"{z_name} must match x in dtype and device ({x.dtype}, {x.device}), got ({z.dtype}, "
                         f"{z.device})")
    if check_values:
        check_finite("x", x)
        check_finite(z_name, z)


def check_model_matches(model, x):
    """x must be on the model's device and in its parameters' dtype (autocast lowers inside, not the input):
    otherwise the first layer fails with a multi-line message that names neither."""
    param = next(iter(model.parameters()), None)
    if param is None:
        return
    if x.device != param.device:
        raise ValueError(f"x must be on the model's device ({param.device}), got {x.device}")
    if x.dtype != param.dtype:
        raise TypeError(f"x must have the model's parameter dtype ({param.dtype}), got {x.dtype}")


def check_output(name, out, inp):
    """The model's output, checked for the input's shape and brought to the input's dtype: under autocast a
    model returns bfloat16 or float16, and the loss is taken in the data's precision (as autocast does for
    torch's own losses); the cast is a no-op without autocast."""
    if not isinstance(out, torch.Tensor) or out.shape != inp.shape:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model output must have its input's shape {tuple(inp.shape)}, got {shape} for {name}")
    return out.to(inp.dtype)


def apply_update(step, compute_gradients, skip_nonfinite):
    """The eager update around a step's compute_gradients(): zero the gradients, compute, optimizer.step().
    With skip_nonfinite a non-finite loss leaves the weights and the optimizer's state untouched and sets
    step.last_skipped; the loss is read as a float before the update, which the caller reads anyway, so this
    costs no extra host sync. (A CUDA graph's update is graph_step.captured_update.)"""
    step.optimizer.zero_grad(set_to_none=True)
    out = compute_gradients()
    if skip_nonfinite:
        step.last_skipped = not math.isfinite(float(out["loss"]))
        if step.last_skipped:
            step.optimizer.zero_grad(set_to_none=True)
            return out
    step.optimizer.step()
    return out


def read_terms(step, out):
    """The update's terms as floats (keys starting with "_" are not terms). A graph's update reports in
    "_skipped" whether it was skipped on the device for a non-finite loss."""
    if "_skipped" in out:
        step.last_skipped = bool(out["_skipped"])
    return {k: float(v) for k, v in out.items() if not k.startswith("_")}


class IGNStep:
    """zero_grad, forward, backward, optimizer.step(); returns a dict of floats: loss, rec, idem, tight.

    mode: "reference" (the readable oracle), "fused" (one second application, no weight copy, same
    gradients), "graph" (fused, captured as a CUDA graph; fused on CPU). amp_dtype: run the forward under
    torch.autocast with this dtype (e.g. torch.bfloat16 on GPU). check_inputs: reject NaN/inf in x and z
    (one host sync per step; the trainer checks its data once at load instead). skip_nonfinite: leave the
    weights untouched when the loss is not finite (see the module docstring). corrupt: x -> c(x) for the
    restoration term loss.lambda_restore · mean d(f(c(x)), x) (default ign_fast.corruptions.TrainingCorruptions()
    when lambda_restore > 0); f(c(x)) is one more call after the four (in the same batched call as f(x) and
    f(z) in "fused" where the model has no batch coupling), and the terms gain "restore". With
    loss.lambda_imle > 0 every x pulls the nearest f(z) of the batch onto itself (an IGN + IMLE hybrid,
    objectives.py; no extra call of f), and the terms gain "imle".
    """

    def __init__(self, model, optimizer, loss=None, mode="reference", amp_dtype=None, check_inputs=True,
                 skip_nonfinite=True, corrupt=None):
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
        if amp_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"amp_dtype must be None, torch.bfloat16 or torch.float16, got {amp_dtype!r}")
        if loss.lambda_restore > 0 and corrupt is None:
            from .corruptions import TrainingCorruptions

            corrupt = TrainingCorruptions()
        if corrupt is not None and not callable(corrupt):
            raise TypeError(f"corrupt must be callable (x -> corrupted x) or None, got {type(corrupt).__name__}")
        self.corrupt = corrupt
        self.model, self.optimizer, self.loss, self.mode = model, optimizer, loss, mode
        self.amp_dtype, self.check_inputs = amp_dtype, check_inputs
        if not isinstance(skip_nonfinite, bool):
            raise TypeError(f"skip_nonfinite must be a bool, got {type(skip_nonfinite).__name__}")
        self.skip_nonfinite = skip_nonfinite
        self.last_skipped = False
        self.grad_sync = None  # set by the trainer under torchrun: averages gradients across ranks
        self.last_plan = None
        self.graph_runner = None
        if mode == "graph":
            from .graph_step import graph_runner_or_none

            self.graph_runner = graph_runner_or_none(model, optimizer, self.compute_gradients, skip_nonfinite)
        if self.graph_runner is None:  # a state dict saved by a graph step comes back capturable: not here
            optimizer.register_load_state_dict_post_hook(lambda opt: set_capturable(opt, False))

    def forward_loss(self, x, z, sync_free=False):
        """The objective's terms for one batch, with the graph attached: (total, rec, idem, tight); total
        includes the restoration and IMLE terms when their weights are > 0."""
        return self._terms(x, z, sync_free)[:4]

    def _terms(self, x, z, sync_free=False):
        """(total, rec, idem, tight, restore, imle): restore is the per-sample d(f(c(x)), x) and imle the
        per-sample d(f(z_j*), x) of the IMLE pull (objectives.py), each None when its weight is 0."""
        device_type = x.device.type
        with torch.autocast(device_type, dtype=self.amp_dtype or torch.bfloat16, enabled=self.amp_dtype is not None,
                            cache_enabled=not sync_free):
            # c(x) drawn once, before any call, so both modes apply f to the same corrupted batch
            cx = self.corrupt(x) if self.loss.lambda_restore > 0 else None
            if self.mode == "reference":
                (total, rec, idem, tight), fz, f_cx = self._reference_forward(x, z, cx)
            else:
                (total, rec, idem, tight), fz, f_cx = self._fused_forward(x, z, cx, sync_free)
            restore = imle = None
            if f_cx is not None:  # f(c(x)) = x: f learns to undo the corruptions (issue 13)
                restore = ops.per_sample_distance(f_cx, x, self.loss.restore_distance or self.loss.distance)
                total = total + self.loss.lambda_restore * restore.mean()
            if self.loss.lambda_imle > 0:  # every x pulls the nearest f(z) of the batch onto itself (issue 14)
                index, _ = ops.nearest_neighbors(x, fz.detach(), self.loss.distance)
                imle = ops.per_sample_distance(fz.index_select(0, index), x, self.loss.distance)
                total = total + self.loss.lambda_imle * imle.mean()
            return total, rec, idem, tight, restore, imle

    def _fused_forward(self, x, z, cx, sync_free):
        from .fused_step import shared_second_application

        model = self.model
        coupled = has_batch_coupling(model)
        f_cx = None
        if coupled:  # BatchNorm with batch statistics: separate calls, so each sees the reference's batch
            fx = check_output("f(x)", model(x), x)
            fz = check_output("f(z)", model(z), z)
        else:
            inputs = [x, z] + ([cx] if cx is not None else [])
            both = torch.cat(inputs)
            out = check_output("f(x, z)", model(both), both)
            fx, fz = out[: x.shape[0]], out[x.shape[0]: x.shape[0] + z.shape[0]]
            if cx is not None:
                f_cx = out[x.shape[0] + z.shape[0]:]
        f_fz, ff_z, self.last_plan = shared_second_application(model, fz, self.loss, coupled, sync_free)
        if coupled and cx is not None:  # after the second application, where the reference makes this call
            f_cx = check_output("f(c(x))", model(cx), cx)
        terms = self.loss(x, fx, fz, check_output("f(f(z))", f_fz, fz), check_output("f(f(z))", ff_z, fz))
        return terms, fz, f_cx

    def _reference_forward(self, x, z, cx=None):
        model = self.model
        fx = check_output("f(x)", model(x), x)
        fz = check_output("f(z)", model(z), z)
        ff_z = check_output("f(f(z))", model(fz.detach()), fz)  # f_θ(sg f_θ(z)): tight role, gradient into θ
        f_fz = check_output("f(f(z))", functional_call(model, frozen_state(model), (fz,)), fz)  # f_θ'(f_θ(z)): idem
        f_cx = None if cx is None else check_output("f(c(x))", model(cx), cx)  # the restoration term's call
        return self.loss(x, fx, fz, f_fz, ff_z), fz, f_cx

    def compute_gradients(self, x, z, sync_free=False):
        """Forward and backward in the step's mode (gradients accumulate into .grad); the four terms (five with
        the restoration term) as 0-dim tensors. With sync_free it never reads a device value on the host (what
        a CUDA graph capture needs)."""
        total, rec, idem, tight, restore, imle = self._terms(x, z, sync_free)
        total.backward()
        names = ["loss", "rec", "idem", "tight"]
        terms = [total.detach(), rec.detach().mean(), idem.detach().mean(), tight.detach().mean()]
        for name, term in (("restore", restore), ("imle", imle)):
            if term is not None:
                names.append(name)
                terms.append(term.detach().mean())
        if self.grad_sync is not None:
            terms = self.grad_sync(terms)
        return dict(zip(names, terms))

    def run_update(self, x, z, skip_nonfinite=False):
        """One eager update; returns the four terms as 0-dim tensors. Without skip_nonfinite it does not
        synchronise with the host."""
        return apply_update(self, lambda: self.compute_gradients(x, z), skip_nonfinite)

    def __call__(self, x, z):
        check_step_inputs(x, z, check_values=False)
        check_model_matches(self.model, x)  # before reading values: a tensor on another device may not be readable
        if self.check_inputs:
            check_finite("x", x)
            check_finite("z", z)
        self.last_skipped = False
        if self.graph_runner is not None:
            out = self.graph_runner(x, z)
        else:
            out = self.run_update(x, z, skip_nonfinite=self.skip_nonfinite)
        return read_terms(self, out)
