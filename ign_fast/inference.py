"""Using a trained f: load it from a checkpoint, generate f^n(z), project inputs with f^n.

Normalisation at inference: a BatchNorm model is applied with batch statistics (train-mode normalisation,
its running statistics left untouched), because the IGN step trains every call with batch statistics and
eval-mode sampling measured worse (see the foundation issue's notes); other models run in eval mode.
"""
import torch
from torch.func import functional_call

from .checkpoint import load_checkpoint
from .models import build_model
from .noise import build_prior


def uses_batch_statistics(model):
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def apply_f(model, y, steps=1):
    """f^steps(y) under the inference normalisation policy above."""
    if uses_batch_statistics(model):
        was_training = model.training
        model.train()
        state = {k: v.detach() for k, v in model.named_parameters()}
        state.update({k: v.clone() for k, v in model.named_buffers()})
        for _ in range(steps):
            y = functional_call(model, state, (y,))
        model.train(was_training)
        return y
    was_training = model.training
    model.eval()
    for _ in range(steps):
        y = model(y)
    model.train(was_training)
    return y


def generate(model, z, steps=1):
    return apply_f(model, z, steps)


def load_trained(path, device="cpu"):
    """(model, prior, meta) from a run folder or checkpoint folder, on device, in eval mode."""
    state = load_checkpoint(path)
    meta = state["meta"]
    model = build_model(**meta["model_config"])
    model.load_state_dict(state["model"])
    prior = build_prior(meta["prior_config"], state_dict=state["prior"])
    return model.to(device).eval(), prior, meta
