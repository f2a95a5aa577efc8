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


# Below this ratio·rec_i is treated as 0, where the clamp takes its limit sign(tight_i)·ratio·rec_i: value 0
# and d/drec = -ratio, finite. Above it tight/(ratio·rec) and its square stay representable in float32.
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


def ign_loss(x, fx, fz, f_fz, ff_z, kind="l1", lambda_rec=20.0, lambda_idem=20.0, lambda_tight=2.5,
             tight_clamp_ratio=1.5):
    """The IGN objective (ign_fast.objectives.IGNLoss) term by term: (total, rec, idem, tight).

    rec_i = d(fx, x)_i, idem_i = d(f_fz, fz)_i, tight_i = -d(ff_z, sg fz)_i, clamped by clamp_tight when
    tight_clamp_ratio is not None; total = λr·mean(rec) + λi·mean(idem) + λt·mean(tight).
    """
    rec = per_sample_distance(fx, x, kind)
    idem = per_sample_distance(f_fz, fz, kind)
    tight = -per_sample_distance(ff_z, fz.detach(), kind)
    if tight_clamp_ratio is not None:
        tight = clamp_tight(tight, rec, tight_clamp_ratio)
    total = lambda_rec * rec.mean() + lambda_idem * idem.mean() + lambda_tight * tight.mean()
    return total, rec, idem, tight


def nearest_neighbors(queries, candidates, metric="l2", chunk_elements=1 << 24):
    """For each row q of queries [B, D]: (index, distance) of its nearest row of candidates [M, D], where the
    distance is per_sample_distance(q, c, metric): the mean over D of |q - c| ("l1") or (q - c)^2 ("l2"),
    computed from direct differences in the accumulation dtype. Ties go to the lowest index; a NaN distance
    counts as +inf. Candidates are taken in chunks of about chunk_elements differences, so memory stays
    bounded (B x chunk distances at a time), never B x M."""
    acc = accumulate_dtype(queries.dtype)
    q = queries.reshape(queries.shape[0], math.prod(queries.shape[1:])).to(acc)
    c = candidates.reshape(candidates.shape[0], math.prod(candidates.shape[1:])).to(acc)
    batch, width = q.shape
    best_dist = torch.full((batch,), math.inf, dtype=acc, device=q.device)
    best_idx = torch.zeros((batch,), dtype=torch.int64, device=q.device)
    chunk = max(1, chunk_elements // max(1, batch * width))
    for start in range(0, c.shape[0], chunk):
        diff = q[:, None, :] - c[None, start:start + chunk, :]
        dist = (diff.abs() if metric == "l1" else diff.square()).mean(dim=2)
        dist = torch.where(torch.isnan(dist), math.inf, dist)
        chunk_dist, chunk_idx = dist.min(dim=1)  # the first of equal minima
        better = chunk_dist < best_dist  # strict: the earlier chunk keeps a tie
        best_dist = torch.where(better, chunk_dist, best_dist)
        best_idx = torch.where(better, chunk_idx + start, best_idx)
    return best_idx, best_dist
