"""Changes to which samples NAIGN pulls, tried and not adopted (issue 14, docs/NAIGN.md "What holds FID up",
"Recall is the gap" and "f(z) draws from about eight directions", "A fifth session").

IMLE pulls, for every training digit, the nearest of the k·B candidates onto it; the samples no digit chose are
never pulled, and some of them are blends of two digits. reverse, second, code, code_swd and random_ign add
batches through f (or its encoder) a step; the others change the search, the distance or the weights and cost
about what the plain step does. Each one's result is in docs/NAIGN.md:

- reverse: B random samples f(z) of the pool are pulled onto their nearest real digit in a bank of the last
  BANK data batches (LAMBDA times the loss's distance). On MNIST-5k it made f copy its training digits.
  Trained on the "λ retuned" demo recipe (lr 5e-4, k 8, R 4), the demo of the time.
- second: every digit also pulls its second-nearest candidate (weight LAMBDA). It trains twice as many samples
  a step and moved FID within the evaluation noise. Trained on today's demo recipe (lr 2e-3, k 16, R 8).
- rejection (RS-IMLE, Vashist, Peng & Li, ECCV 2024): no extra forward; the search skips every candidate within
  EPSILON (the loss's distance) of any digit of the batch, so each digit pulls the nearest candidate that is not
  already on the data. Today's demo recipe. On MNIST-5k its samples became ones.
- unique: each candidate is pulled at most once per pool: within a batch digits take the nearest candidate not
  yet taken (greedily, the closest pairs first), and a candidate pulled in one step is not searched again until
  the pool is refreshed (its recorded f(z) is stale: it has moved toward the digit that pulled it). Today's
  demo recipe. Recall fell.
- multiscale: every distance NAIGN takes (the search, the pull, reconstruction, restoration) becomes mean l1
  at full resolution plus WEIGHT x (mean l1 of the images average-pooled 2x + mean l1 pooled 4x), so that digits
  match candidates by shape more than by exact stroke position. Today's demo recipe. Recall fell.
- weighted: each digit's pull weighted by (d / mean d)^GAMMA over the batch (d its distance to its nearest
  candidate; mean weight 1), so that the digits far from every sample pull harder. Today's demo recipe. Drew
  more blends between classes. GAMMA 0 is the plain pull, which with --set tries other TrainConfig fields.
- code: every digit's pulled sample also has its code drawn to the digit's code, LAMBDA x mean
  |encode(z*) - sg encode(x)| (a model with encode, as DCGAN28). Today's demo recipe. At 0.02 it collapsed to one
  code (one output) for every input; at 0.1 it drew worse digits.
- code_swd: the codes of B random pool samples, encode(z), drawn as a distribution onto the batch's codes of
  digits, sg encode(x): LAMBDA x the sliced Wasserstein-1 distance over 64 random directions, both divided by sg
  the digit codes' spread (so shrinking every code cannot lower it). Today's demo recipe. At 0.1 the noise codes'
  mean moved onto the digits' but the digits' codes narrowed to match (participation ratio 20.9 -> 10.7), and
  FID rose; at 1 every input gave one output.
- random_ign: IGN's idempotence (LAMBDA) and, with --tight, its clamped tightness on B random samples of the
  pool, the ones no digit pulls: two or three more batches through f a step. Today's demo recipe. Recall fell.

    python experiments/naign_pulls.py reverse OUT SEED LAMBDA --bank 32 [--set field=value ...]
    python experiments/naign_pulls.py second OUT SEED LAMBDA [--set field=value ...]
    python experiments/naign_pulls.py rejection OUT SEED EPSILON [--set field=value ...]
    python experiments/naign_pulls.py unique OUT SEED 0 [--set field=value ...]
    python experiments/naign_pulls.py multiscale OUT SEED WEIGHT [--set field=value ...]
    python experiments/naign_pulls.py weighted OUT SEED GAMMA [--set field=value ...]
    python experiments/naign_pulls.py code OUT SEED LAMBDA [--set field=value ...]
    python experiments/naign_pulls.py code_swd OUT SEED LAMBDA [--set field=value ...]
    python experiments/naign_pulls.py random_ign OUT SEED LAMBDA [--tight WEIGHT] [--set field=value ...]

then `ign-fast eval OUT`. --set passes more TrainConfig fields. rejection and unique print the share of the
pool they kept out of the search, by quarter of training.
"""
import argparse
import os
import shutil
import types

import torch
import torch.nn.functional as F

from ign_fast import ops
from ign_fast.naign import NAIGNLoss, NAIGNStep
from ign_fast.trainer import Trainer, TrainConfig

# the Makefile's DEMO_FLAGS as TrainConfig fields: the "λ retuned" recipe, and today's
LAMBDA_RETUNED = dict(lambda_imle=4.0, lambda_restore=0.5, restore_corruptions="noise")
DEMO = dict(LAMBDA_RETUNED, lr=2e-3, candidates=16, refresh_every=8)


def distance_matrix(queries, candidates, metric):
    """[B, M]: the distance ops.nearest_neighbors ranks by, mean |q - c| ("l1") or mean (q - c)^2 ("l2")."""
    q, c = queries.flatten(1).float(), candidates.flatten(1).float()
    dist = torch.cdist(q, c, p=1 if metric == "l1" else 2)
    return dist / q.shape[1] if metric == "l1" else dist.square() / q.shape[1]


def reverse_pull(step, x, z_pool, searched, weight, bank_batches):
    """weight · d(f(z_r), nearest real digit in the bank), for B random z_r of the pool."""
    bank = getattr(step, "_bank", None)
    step._bank = x.detach() if bank is None else torch.cat([x.detach(), bank])[:bank_batches * x.shape[0]]
    picked = torch.randint(z_pool.shape[0], (x.shape[0],), device=x.device)
    fz = step.model(z_pool.index_select(0, picked))
    nearest, _ = ops.nearest_neighbors(fz.detach(), step._bank, step.loss.distance)
    return weight * ops.per_sample_distance(fz, step._bank.index_select(0, nearest), step.loss.distance).mean()


def second_pull(step, x, z_pool, searched, weight):
    """weight · d(f(z₂), x), z₂ the second-nearest candidate of each x under the loss's distance."""
    with torch.no_grad():
        second = distance_matrix(x, searched, step.loss.distance).topk(2, dim=1, largest=False).indices[:, 1]
    return weight * ops.per_sample_distance(step.model(z_pool.index_select(0, second)), x, step.loss.distance).mean()


def rejecting_nearest(epsilon, counts):
    """ops.nearest_neighbors that never returns a candidate within epsilon of any query (a row whose every
    candidate is that close keeps its plain nearest); counts gathers the share of candidates rejected."""
    plain = ops.nearest_neighbors

    def nearest(queries, candidates, metric="l2"):
        dist = distance_matrix(queries, candidates, metric)
        close = dist.min(0).values < epsilon
        counts.append(close.float().mean().item())
        kept = dist.masked_fill(close, float("inf"))
        index = kept.argmin(1)
        if bool((~torch.isfinite(kept.gather(1, index[:, None]))).any()):
            return plain(queries, candidates, metric)
        return index, dist.gather(1, index[:, None])[:, 0]

    return nearest


def unique_nearest(counts):
    """ops.nearest_neighbors where no candidate is matched twice between two refreshes of the pool (a new
    candidates tensor); counts gathers, per call, the share of the pool already taken before it."""
    taken = {"key": None, "mask": None}

    def nearest(queries, candidates, metric="l2"):
        dist = distance_matrix(queries, candidates, metric)
        rows, pool = dist.shape
        # a refresh makes new candidates, whose memory may reuse the old ones': know them by their values too
        key = (candidates.data_ptr(), pool, float(candidates[0].sum()), float(candidates[-1].sum()))
        if taken["key"] != key:
            taken["key"], taken["mask"] = key, torch.zeros(pool, dtype=torch.bool, device=dist.device)
        mask = taken["mask"]
        if int(mask.sum()) + rows > pool:  # not enough left for every digit: start over
            mask.zero_()
        counts.append(mask.float().mean().item())
        free = dist.masked_fill(mask, float("inf"))
        index = torch.empty(rows, dtype=torch.long, device=dist.device)
        for row in free.min(1).values.argsort().tolist():  # the closest digits choose first
            j = int(free[row].argmin())
            index[row] = j
            free[:, j] = float("inf")
            mask[j] = True
        return index, dist.gather(1, index[:, None])[:, 0]

    return nearest


def multiscale_ops(weight):
    """A stand-in for ign_fast.ops inside ign_fast.naign whose two distances are multiscale l1."""

    def scales(x):
        x = x.float()
        return [x.flatten(1), F.avg_pool2d(x, 2).flatten(1), F.avg_pool2d(x, 4).flatten(1)]

    def per_sample_distance(a, b, kind="l1"):
        parts = [(p - q).abs().mean(1) for p, q in zip(scales(a), scales(b))]
        return parts[0] + weight * (parts[1] + parts[2])

    def nearest_neighbors(queries, candidates, metric="l1"):
        full, *coarse = [distance_matrix(q, c, "l1") for q, c in zip(scales(queries), scales(candidates))]
        distance, index = (full + weight * sum(coarse)).min(1)
        return index, distance

    return types.SimpleNamespace(per_sample_distance=per_sample_distance, nearest_neighbors=nearest_neighbors)


def with_extra_term(term):
    """NAIGNStep._forward with term(step, x, z_pool, the candidates searched) added to its total."""
    forward = NAIGNStep._forward

    def _forward(self, x, z_pool, candidates=None):
        terms = list(forward(self, x, z_pool, candidates))
        terms[0] = terms[0] + term(self, x, z_pool, terms[5])  # terms[5]: the candidates this call searched
        return tuple(terms)

    return _forward


def code_pull(step, x, z_pool, searched, weight):
    """weight · mean |encode(z*) - sg(encode(x))| for each digit x and its nearest candidate z*: the pulled noise
    sample's code is drawn to the digit's own code, so that the codes f makes from noise spread over the region
    its codes of digits fill (needs a model with encode, as DCGAN28)."""
    with torch.no_grad():
        index, _ = ops.nearest_neighbors(x, searched, step.loss.distance)  # the step's own search, again: its index
        target = step.model.encode(x)                                       # stays inside _forward (4% of a step)
    return weight * (step.model.encode(z_pool.index_select(0, index)) - target).abs().mean()


def code_sliced_wasserstein(step, x, z_pool, searched, weight, projections=64):
    """weight · sliced Wasserstein-1 distance between the codes of B random pool samples, encode(z), and sg of the
    batch's codes of digits, encode(x): each of `projections` random unit directions sorts both sets of B
    projected codes and pairs them in order. Both are divided by sg(the digit codes' RMS spread) first, so the
    term cannot be lowered by shrinking every code (the decoder's GroupNorm would undo the shrinking, which is how
    the pairwise `code` pull collapsed). The gradient moves the encoder's image of the prior onto the region
    its codes of digits fill, as a whole distribution, not sample by sample."""
    picked = torch.randint(z_pool.shape[0], (x.shape[0],), device=x.device)
    noise = step.model.encode(z_pool.index_select(0, picked)).flatten(1).float()
    with torch.no_grad():
        digits = step.model.encode(x).flatten(1).float()
        scale = (digits - digits.mean(0)).square().mean().sqrt().clamp_min(1e-8)
        directions = F.normalize(torch.randn(digits.shape[1], projections, device=x.device), dim=0)
        target = (digits / scale @ directions).sort(0).values
    return weight * ((noise / scale @ directions).sort(0).values - target).abs().mean()


def random_ign_forward(idem_weight, tight_weight, ratio=1.5):
    """NAIGNStep._forward plus IGN's idempotence and tightness terms on B random samples of the pool, the ones
    the IMLE pull leaves alone: idem_weight · d(f'(f(z)), f(z)) (f' frozen: the gradient moves f(z) toward f's
    fixed points) and -tight_weight · d(f(sg f(z)), sg f(z)), clamped by ratio · rec as IGNLoss clamps it (the
    gradient makes f move off the samples it fixes, so blends stop being fixed points)."""
    from torch.func import functional_call

    from ign_fast import reference
    from ign_fast.naign import frozen_state

    forward = NAIGNStep._forward

    def _forward(self, x, z_pool, candidates=None):
        terms = list(forward(self, x, z_pool, candidates))
        d = self.loss.distance
        picked = torch.randint(z_pool.shape[0], (x.shape[0],), device=x.device)
        fz = self.model(z_pool.index_select(0, picked))
        extra = idem_weight * ops.per_sample_distance(functional_call(self.model, frozen_state(self.model), (fz,)),
                                                      fz, d).mean()
        if tight_weight > 0:
            held = fz.detach()
            tight = -ops.per_sample_distance(self.model(held), held, d)
            extra = extra + tight_weight * reference.clamp_tight(tight, terms[1].detach(), ratio).mean()
        terms[0] = terms[0] + extra
        return tuple(terms)

    return _forward


def weighted_imle_loss(gamma):
    """NAIGNLoss.forward with digit i's pull weighted by (d_i / mean d)^gamma (detached, mean 1 over the batch),
    d_i = d(f(z*_i), x_i): the digits farthest from every sample, the ones recall misses, pull harder."""
    forward = NAIGNLoss.forward

    def weighted(self, x, fx, f_znn, f_f_znn=None):
        total, rec, imle, idem = forward(self, x, fx, f_znn, f_f_znn)
        w = (imle.detach() / imle.detach().mean()).pow(gamma)
        total = total + self.lambda_imle * ((w / w.mean() - 1) * imle).mean()  # replaces the mean by the weighted
        return total, rec, imle, idem

    return weighted


def parse_value(value):
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def training_config(parser, base, out, seed, items):
    """The TrainConfig fields of a 2,000-step run of `base` (a recipe above) into out, with --set's
    FIELD=VALUE items on top; a malformed item or an unknown field is parser.error's one line."""
    config = dict(base, out=out, seed=seed, steps=2000, sample_every=500, checkpoint_every=500, progress=False)
    for item in items:
        if "=" not in item:
            parser.error(f"--set takes FIELD=VALUE, got {item!r}")
        field, value = item.split("=", 1)
        if field not in TrainConfig.__dataclass_fields__:
            parser.error(f"--set: TrainConfig has no field {field!r}")
        config[field] = parse_value(value)
    return config


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variant", choices=("reverse", "second", "rejection", "unique", "multiscale", "weighted",
                                            "code", "code_swd", "random_ign"))
    parser.add_argument("out")
    parser.add_argument("seed", type=int)
    parser.add_argument("weight", type=float, help="the extra term's weight (LAMBDA), or rejection's EPSILON")
    parser.add_argument("--bank", type=int, default=32, help="reverse: data batches kept to search (default 32)")
    parser.add_argument("--tight", type=float, default=0.0, help="random_ign: the tightness weight (default 0)")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="more TrainConfig fields")
    args = parser.parse_args()
    extra_terms = {  # variants that add one term to the step's total: term(step, x, z_pool, searched candidates)
        "reverse": lambda step, x, z, searched: reverse_pull(step, x, z, searched, args.weight, args.bank),
        "second": lambda step, x, z, searched: second_pull(step, x, z, searched, args.weight),
        "code": lambda step, x, z, searched: code_pull(step, x, z, searched, args.weight),
        "code_swd": lambda step, x, z, searched: code_sliced_wasserstein(step, x, z, searched, args.weight),
    }
    base = LAMBDA_RETUNED if args.variant == "reverse" else DEMO
    if args.variant in extra_terms:
        NAIGNStep._forward = with_extra_term(extra_terms[args.variant])
    elif args.variant == "multiscale":
        import ign_fast.naign

        ign_fast.naign.ops = multiscale_ops(args.weight)
    elif args.variant == "random_ign":
        NAIGNStep._forward = random_ign_forward(args.weight, args.tight)
    elif args.variant == "weighted":
        NAIGNLoss.forward = weighted_imle_loss(args.weight)
    else:
        counts = []
        make = unique_nearest(counts) if args.variant == "unique" else rejecting_nearest(args.weight, counts)
        ops.nearest_neighbors = make  # naign calls ops.nearest_neighbors
    config = training_config(parser, base, args.out, args.seed, args.set)
    try:
        existed = os.path.exists(args.out)
        trainer = Trainer(TrainConfig(**config))
    except (ValueError, TypeError) as error:  # a used run folder, a bad --set value: one line
        parser.error(str(error))
    if args.variant in ("code", "code_swd") and not hasattr(trainer.model, "encode"):
        if not existed:  # the folder this call made, nothing of the user's: leave no half-started run behind
            shutil.rmtree(args.out)
        parser.error(f"{args.variant} needs a model with encode (as dcgan28), got {type(trainer.model).__name__}")
    trainer.fit()
    if args.variant in ("rejection", "unique"):
        what = "rejected" if args.variant == "rejection" else "already taken"
        quarters = [counts[i:i + len(counts) // 4] for i in range(0, len(counts), max(1, len(counts) // 4))]
        print(f"share of candidates {what}, by quarter of training: "
              + " ".join(f"{sum(part) / len(part):.3f}" for part in quarters if part))


if __name__ == "__main__":
    main()
