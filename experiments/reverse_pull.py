"""A tried and rejected idea (issue 14, docs/NAIGN.md "What holds FID up"): NAIGN plus a reverse pull.

IMLE pulls, for every training digit, the nearest generated sample onto it; samples that no digit chose are never
pulled, and some are blends of two digits. This adds the opposite direction: each step, B random samples f(z) of
the pool are pulled onto their nearest real digit in a bank of the last BANK data batches (lambda_rev times the
same distance). It is not in the package: on MNIST-5k it made f copy its training digits.

    python experiments/reverse_pull.py OUT SEED LAMBDA_REV BANK [config_field=value ...]

then `ign-fast eval OUT`. The other settings are `make demo`'s (DEMO_FLAGS); extra fields go to TrainConfig.
"""
import sys

import torch

from ign_fast import ops
from ign_fast.naign import NAIGNStep
from ign_fast.trainer import Trainer, TrainConfig


def parse(value):
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def with_reverse_pull(lambda_rev, bank_batches):
    """NAIGNStep._forward with the reverse pull added to its total (one more batch through f)."""
    forward = NAIGNStep._forward

    def _forward(self, x, z_pool, candidates=None):
        terms = list(forward(self, x, z_pool, candidates))
        bank = getattr(self, "_bank", None)
        self._bank = x.detach() if bank is None else torch.cat([x.detach(), bank])[:bank_batches * x.shape[0]]
        picked = torch.randint(z_pool.shape[0], (x.shape[0],), device=x.device)
        fz = self.model(z_pool.index_select(0, picked))
        nearest, _ = ops.nearest_neighbors(fz.detach(), self._bank, self.loss.distance)
        reverse = ops.per_sample_distance(fz, self._bank.index_select(0, nearest), self.loss.distance)
        terms[0] = terms[0] + lambda_rev * reverse.mean()
        return tuple(terms)

    return _forward


def main():
    if len(sys.argv) < 5:
        sys.exit(__doc__)
    out, seed, lambda_rev, bank = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    NAIGNStep._forward = with_reverse_pull(lambda_rev, bank)
    config = dict(out=out, seed=seed, steps=2000, sample_every=500, checkpoint_every=500, progress=False,
                  lambda_imle=4.0, lambda_restore=0.5, restore_corruptions="noise")
    config.update({key: parse(value) for key, value in (kv.split("=", 1) for kv in sys.argv[5:])})
    Trainer(TrainConfig(**config)).fit()


if __name__ == "__main__":
    main()
