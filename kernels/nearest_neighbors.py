"""Triton kernel of ign_fast.nearest_neighbors (selected by ign_fast.set_backend("triton"); registered as the
op ign_fast::nearest_neighbors_triton in ign_fast/ops.py so torch.compile can trace it).

Each program takes BLOCK_Q queries and one contiguous split of the candidates, walks the split in tiles of
BLOCK_C candidates, and for each tile sums |q - c| or (q - c)^2 over D in chunks of BLOCK_D from direct
differences ([BLOCK_Q, BLOCK_C, BLOCK_D] in registers), then folds the tile into a running (min, argmin)
per query: memory is O(B x splits), never B x M. The splits' partial results are merged in order by torch.
Distances are the mean over D, as ign_fast.per_sample_distance; ties go to the lowest index (tl.argmin keeps
the leftmost minimum, a later tile or split replaces the best only when strictly smaller, and the merge
takes the first of equal minima); a NaN distance counts as +inf.

Loop bounds are tl.constexpr: the interpreter (TRITON_INTERPRET=1, how this runs on CPU) fails on runtime
loop bounds with numpy >= 2.4 (triton-lang/triton#9171). The cost is a recompile per (D, split length).
Without a GPU this only runs under TRITON_INTERPRET=1, which must be set before triton is imported.
"""
import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._common import on_device


@triton.jit
def _nearest_neighbors_kernel(q_ptr, c_ptr, dist_ptr, idx_ptr, batch, count, width, split_len,
                              L1: tl.constexpr, ACC: tl.constexpr, BLOCK_Q: tl.constexpr,
                              BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, D_BLOCKS: tl.constexpr,
                              C_TILES: tl.constexpr):
    pid_q = tl.program_id(0)
    split = tl.program_id(1)
    rows_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_q = rows_q < batch
    c_begin = split * split_len
    c_end = tl.minimum(c_begin + split_len, count)
    best = tl.full([BLOCK_Q], float("inf"), ACC)
    # if every distance of the split is +inf (or NaN) its answer is its first index, as an argmin's
    best_idx = tl.zeros([BLOCK_Q], tl.int64) + c_begin.to(tl.int64)
    for t in range(C_TILES):
        rows_c = c_begin + t * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = rows_c < c_end
        acc = tl.zeros([BLOCK_Q, BLOCK_C], ACC)
        for kb in range(D_BLOCKS):
            cols = kb * BLOCK_D + tl.arange(0, BLOCK_D)
            mask_d = cols < width
            q = tl.load(q_ptr + rows_q[:, None].to(tl.int64) * width + cols[None, :],
                        mask=mask_q[:, None] & mask_d[None, :], other=0.0).to(ACC)
            c = tl.load(c_ptr + rows_c[:, None].to(tl.int64) * width + cols[None, :],
                        mask=mask_c[:, None] & mask_d[None, :], other=0.0).to(ACC)
            diff = q[:, None, :] - c[None, :, :]
            if L1:
                acc += tl.sum(tl.abs(diff), axis=2)
            else:
                acc += tl.sum(diff * diff, axis=2)
        dist = acc / width
        dist = tl.where(mask_c[None, :] & (dist == dist), dist, float("inf"))  # padding and NaN never win
        tile_best = tl.min(dist, axis=1)
        tile_idx = tl.argmin(dist, axis=1, tie_break_left=True).to(tl.int64)
        better = tile_best < best
        best = tl.where(better, tile_best, best)
        best_idx = tl.where(better, c_begin + t * BLOCK_C + tile_idx, best_idx)
    out = split * batch + rows_q
    tl.store(dist_ptr + out, best, mask=mask_q)
    tl.store(idx_ptr + out, best_idx, mask=mask_q)


def _default_splits(device, query_blocks, candidate_tiles):
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        wanted = -(-4 * sms // query_blocks)
    else:
        wanted = 2  # the interpreter: still exercise the merge
    return max(1, min(wanted, candidate_tiles))


def nearest_neighbors_triton(queries, candidates, metric="l2", *, block_q=16, block_c=16, block_d=32, splits=None):
    """queries [B, D], candidates [M, D] (same dtype and device; already checked by ign_fast.nearest_neighbors)
    -> (index [B] int64, distance [B]), as ign_fast.nearest_neighbors."""
    if queries.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise RuntimeError("the Triton backend needs a CUDA GPU, or TRITON_INTERPRET=1 set before triton is imported")
    acc_dtype = torch.float64 if queries.dtype == torch.float64 else torch.float32
    acc = tl.float64 if acc_dtype == torch.float64 else tl.float32
    q = queries.contiguous()
    c = candidates.contiguous()
    batch, width = q.shape
    count = c.shape[0]
    index = torch.empty(batch, dtype=torch.int64, device=q.device)
    distance = torch.empty(batch, dtype=acc_dtype, device=q.device)
    if batch == 0:
        return index, distance
    query_blocks = triton.cdiv(batch, block_q)
    candidate_tiles = triton.cdiv(count, block_c)
    if splits is None:
        splits = _default_splits(q.device, query_blocks, candidate_tiles)
    splits = max(1, min(splits, candidate_tiles))
    tiles_per_split = triton.cdiv(candidate_tiles, splits)
    splits = triton.cdiv(candidate_tiles, tiles_per_split)
    part_dist = torch.empty((splits, batch), dtype=acc_dtype, device=q.device)
    part_idx = torch.empty((splits, batch), dtype=torch.int64, device=q.device)
    # wrap_triton: the launch is traceable inside the triton_op ign_fast::nearest_neighbors_triton (ops.py)
    with on_device(q):
        wrap_triton(_nearest_neighbors_kernel)[(query_blocks, splits)](
            q, c, part_dist, part_idx, batch, count, width, tiles_per_split * block_c,
            L1=metric == "l1", ACC=acc, BLOCK_Q=block_q, BLOCK_C=block_c, BLOCK_D=block_d,
            D_BLOCKS=triton.cdiv(width, block_d), C_TILES=tiles_per_split)
    # merge the splits in order: torch.min over a dim returns the first of equal minima, i.e. the lowest split
    distance, split = part_dist.min(dim=0)
    index = part_idx.gather(0, split[None, :])[0]
    return index, distance
