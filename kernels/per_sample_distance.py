"""Triton kernels of ign_fast.per_sample_distance (the op and its contract live in ign_fast/ops.py).

Forward: one program per (row, chunk) writes a partial sum, and the partials of a row are added in a fixed
order (deterministic). Backward: elementwise, one program per (row, chunk) with the row's scale loaded once.
Inputs arrive as contiguous [rows, n] tensors.
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._common import acc_dtype, distance_derivative, distance_term, launch_plan, on_device


@triton.jit
def _partials_kernel(a_ptr, b_ptr, part_ptr, n, chunks, L1: tl.constexpr, CHUNK: tl.constexpr,
                     BLOCK: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    base = row.to(tl.int64) * n
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], ACC)
    for start in range(0, CHUNK, BLOCK):
        idx = chunk * CHUNK + start + offs
        mask = idx < n
        a = tl.load(a_ptr + base + idx, mask=mask, other=0.0).to(ACC)
        b = tl.load(b_ptr + base + idx, mask=mask, other=0.0).to(ACC)
        acc += distance_term(a - b, L1)
    tl.store(part_ptr + row * chunks + chunk, tl.sum(acc, axis=0))


@triton.jit
def _backward_kernel(grad_ptr, a_ptr, b_ptr, ga_ptr, gb_ptr, n, L1: tl.constexpr, CHUNK: tl.constexpr,
                     BLOCK: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    base = row.to(tl.int64) * n
    scale = tl.load(grad_ptr + row).to(ACC) / n
    offs = tl.arange(0, BLOCK)
    for start in range(0, CHUNK, BLOCK):
        idx = chunk * CHUNK + start + offs
        mask = idx < n
        a = tl.load(a_ptr + base + idx, mask=mask, other=0.0).to(ACC)
        b = tl.load(b_ptr + base + idx, mask=mask, other=0.0).to(ACC)
        g = scale * distance_derivative(a - b, L1)
        tl.store(ga_ptr + base + idx, g.to(ga_ptr.dtype.element_ty), mask=mask)
        tl.store(gb_ptr + base + idx, (-g).to(gb_ptr.dtype.element_ty), mask=mask)


def forward(a, b, kind):
    """[B] distances of contiguous a, b viewed as [B, n]."""
    rows = a.shape[0]
    n = a.numel() // rows
    chunk, block, chunks = launch_plan(n)
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    partials = torch.empty((rows, chunks), device=a.device, dtype=acc)
    with on_device(a):
        wrap_triton(_partials_kernel)[(rows, chunks)](a, b, partials, n, chunks, L1=kind == "l1", CHUNK=chunk,
                                                       BLOCK=block, ACC=acc_dtype(a.dtype))
    return partials.sum(dim=1) / n


def backward(grad, a, b, kind):
    rows = a.shape[0]
    n = a.numel() // rows
    chunk, block, chunks = launch_plan(n)
    grad_a = torch.empty_like(a)
    grad_b = torch.empty_like(a)
    with on_device(a):
        wrap_triton(_backward_kernel)[(rows, chunks)](grad, a, b, grad_a, grad_b, n, L1=kind == "l1", CHUNK=chunk,
                                                       BLOCK=block, ACC=acc_dtype(a.dtype))
    return grad_a, grad_b
