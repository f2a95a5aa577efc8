"""Two extra pulls tried on NAIGN and not adopted (issue 14, docs/NAIGN.md "What holds FID up").

IMLE pulls, for every training digit, the nearest of the k·B candidates onto it; the samples no digit chose are
never pulled, and some of them are blends of two digits. Each variant adds one more batch through f a step:

- reverse: B random samples f(z) of the pool are pulled onto their nearest real digit in a bank of the last
  BANK data batches (LAMBDA times the loss's distance). On MNIST-5k it made f copy its training digits.
  Trained on the "λ retuned" demo recipe (lr 5e-4, k 8, R 4), the demo of the time.
- second: every digit also pulls its second-nearest candidate (weight LAMBDA). It trains twice as many samples
  a step and moved FID within the evaluation noise. Trained on today's demo recipe (lr 2e-3, k 16, R 8).

    python experiments/naign_pulls.py reverse OUT SEED LAMBDA --bank 32 [--set field=value ...]
    python experiments/naign_pulls.py second OUT SEED LAMBDA [--set field=value ...]

then `ign-fast eval OUT`. --set passes more TrainConfig fields.
"""
import argparse

import torch

from ign_fast import ops
from ign_fast.naign import NAIGNStep
from ign_fast.trainer import Trainer, TrainConfig

# the Makefile's DEMO_FLAGS as TrainConfig fields: the "λ retuned" recipe, and today's
LAMBDA_RETUNED = dict(lambda_imle=4.0, lambda_restore=0.5, restore_corruptions="noise")
DEMO = dict(LAMBDA_RETUNED, lr=2e-3, candidates=16, refresh_every=8)


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
    with torch.no_grad():  # mean l1 / mean squared distance rank as cdist p = 1 / p = 2 do
        p = 1 if step.loss.distance == "l1" else 2
        dist = torch.cdist(x.flatten(1).float(), searched.flatten(1).float(), p=p)
        second = dist.topk(2, dim=1, largest=False).indices[:, 1]
    return weight * ops.per_sample_distance(step.model(z_pool.index_select(0, second)), x, step.loss.distance).mean()


def with_extra_term(term):
    """NAIGNStep._forward with term(step, x, z_pool, the candidates searched) added to its total."""
    forward = NAIGNStep._forward

    def _forward(self, x, z_pool, candidates=None):
        terms = list(forward(self, x, z_pool, candidates))
        terms[0] = terms[0] + term(self, x, z_pool, terms[5])  # terms[5]: the candidates this call searched
        return tuple(terms)

    return _forward


def parse_value(value):
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variant", choices=("reverse", "second"))
    parser.add_argument("out")
    parser.add_argument("seed", type=int)
    parser.add_argument("weight", type=float, help="the extra term's weight (LAMBDA)")
    parser.add_argument("--bank", type=int, default=32, help="reverse: data batches kept to search (default 32)")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="more TrainConfig fields")
    args = parser.parse_args()
    if args.variant == "reverse":
        NAIGNStep._forward = with_extra_term(
            lambda step, x, z, searched: reverse_pull(step, x, z, searched, args.weight, args.bank))
        base = LAMBDA_RETUNED
    else:
        NAIGNStep._forward = with_extra_term(
            lambda step, x, z, searched: second_pull(step, x, z, searched, args.weight))
        base = DEMO
    config = dict(base, out=args.out, seed=args.seed, steps=2000, sample_every=500, checkpoint_every=500,
                  progress=False)
    for item in args.set:
        if "=" not in item:
            parser.error(f"--set takes FIELD=VALUE, got {item!r}")
        field, value = item.split("=", 1)
        if field not in TrainConfig.__dataclass_fields__:
            parser.error(f"--set: TrainConfig has no field {field!r}")
        config[field] = parse_value(value)
    Trainer(TrainConfig(**config)).fit()


if __name__ == "__main__":
    main()
