"""Plain PyTorch version of every ign_fast op: the oracle the kernels are tested against, and the path
used where the compiled extension is missing. Written to be read, not to be fast."""
import math

import torch

DISTANCE_KINDS = ("l1", "l2")


def accumulate_dtype(dtype):
    """float64 stays float64; every other floating dtype is accumulated (and reported) in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def per_sample_distance(a, b, kind="l1"):
    """d(a, b)_i: mean over all non-batch dims of |a - b| ("l1") or (a - b)^2 ("l2"), as a [B] tensor."""
    acc = accumulate_dtype(a.dtype)
    diff = a.to(acc) - b.to(acc)
    diff = diff.abs() if kind == "l1" else diff.square()
    return diff.reshape(a.shape[0], math.prod(a.shape[1:])).mean(dim=1)
