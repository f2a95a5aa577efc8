"""Pieces shared by the Triton kernels: the distance term and its derivative, and the launch plan of a
per-row reduction split into chunks (one program per (row, chunk))."""
import contextlib

import triton
import triton.language as tl

# One program reduces at most MAX_CHUNK elements of a row in steps of at most MAX_BLOCK: a batch of 1 with a
# 196k-element row still spreads over 24 programs, and a batch of 256 small rows runs one program per row.
MAX_CHUNK = 8192
MAX_BLOCK = 1024


def launch_plan(n):
    """(chunk, block, chunks per row) for rows of n elements."""
    chunk = min(triton.next_power_of_2(n), MAX_CHUNK)
    block = min(chunk, MAX_BLOCK)
    return chunk, block, triton.cdiv(n, chunk)


def on_device(t):
    """The context a launch for tensor t must run in. Triton launches on the current CUDA device, not on the
    device of the tensors it is given: without this, tensors on cuda:1 would be handed to a kernel running
    on cuda:0 (an illegal address, or another GPU's memory read through peer access). CPU tensors (the
    interpreter) need nothing."""
    import torch

    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def acc_dtype(dtype):
    import torch

    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def distance_term(d, L1: tl.constexpr):
    if L1:
        r = tl.abs(d)
    else:
        r = d * d
    return r


@triton.jit
def distance_derivative(d, L1: tl.constexpr):
    """d/dd of distance_term, before the 1/n of the mean; sign(0) = 0 as torch's abs backward."""
    if L1:
        r = (d > 0).to(d.dtype) - (d < 0).to(d.dtype)
    else:
        r = 2.0 * d
    return r
