"""An exponential moving average of a model's weights, the way timm's ModelEmaV2 and diffusers' EMAModel keep
one: a shadow copy updated after each optimizer step, used for sampling, projection, evaluation and export.

decay is the per-step factor (e.g. 0.999: an average over roughly the last 1,000 steps). The first updates use
min(decay, (1 + t) / (10 + t)) so the average is not dominated by the random initial weights (the warm-up
that diffusers and TensorFlow's ExponentialMovingAverage apply). Floating-point parameters and buffers
(BatchNorm's running statistics) are averaged; integer buffers (BatchNorm's batch counter) are copied.
"""
import contextlib

import torch


class EMA:
    def __init__(self, model, decay=0.999):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be a number in (0, 1), e.g. 0.999, got {decay!r}")
        self.decay = float(decay)
        self.updates = 0
        self.shadow = {name: t.detach().clone() for name, t in model.state_dict().items()}

    def current_decay(self):
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, model):
        """Move the average towards the model's current weights (call after optimizer.step())."""
        decay = self.current_decay()
        state = model.state_dict()
        floats, targets = [], []
        for name, shadow in self.shadow.items():
            value = state[name]
            if shadow.is_floating_point():
                floats.append(shadow)
                targets.append(value.detach().to(shadow.dtype))
            else:
                shadow.copy_(value)
        if floats:
            torch._foreach_lerp_(floats, targets, 1.0 - decay)
        self.updates += 1

    def state_dict(self):
        """The averaged weights under the model's own names, plus nothing else: what a checkpoint stores as
        ema.safetensors and what model.load_state_dict takes."""
        return dict(self.shadow)

    def load_state_dict(self, state, updates=None):
        missing = set(self.shadow) - set(state)
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} of the model's tensors, e.g. {sorted(missing)[0]!r}")
        for name, shadow in self.shadow.items():
            value = state[name]
            if not isinstance(value, torch.Tensor) or value.shape != shadow.shape:
                got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"EMA state {name!r} must have shape {tuple(shadow.shape)}, got {got}")
            shadow.copy_(value)
        if updates is not None:
            self.updates = int(updates)

    @torch.no_grad()
    def copy_to(self, model):
        model.load_state_dict(self.shadow)

    @contextlib.contextmanager
    def applied(self, model):
        """Run a block with the averaged weights in the model, then put the trained weights back."""
        saved = {name: t.detach().clone() for name, t in model.state_dict().items()}
        self.copy_to(model)
        try:
            yield model
        finally:
            model.load_state_dict(saved)
