"""A tried idea (issue 14, docs/NAIGN.md "What holds FID up"): every digit also pulls its second-nearest candidate.

IMLE pulls, for every training digit, only the nearest of the k·B candidates; the samples no digit chose are
never pulled, and some of them are blends of two digits. Here each digit pulls its two nearest candidates (the
second with weight LAMBDA_SECOND, the same distance), so twice as many samples are trained each step, for one more
batch through f. Not in the package.

    python experiments/second_pull.py OUT SEED LAMBDA_SECOND [config_field=value ...]

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


def with_second_pull(lambda_second):
    """NAIGNStep._forward with the second-nearest pull added to its total."""
    forward = NAIGNStep._forward

    def _forward(self, x, z_pool, candidates=None):
        terms = list(forward(self, x, z_pool, candidates))
        searched = terms[5]  # the candidates this call searched (made now, or the pool's last refresh)
        with torch.no_grad():
            dist = torch.cdist(x.flatten(1).float(), searched.flatten(1).float(), p=1)
            second = dist.topk(2, dim=1, largest=False).indices[:, 1]
        f_second = self.model(z_pool.index_select(0, second))
        pull = ops.per_sample_distance(f_second, x, self.loss.distance)
        terms[0] = terms[0] + lambda_second * pull.mean()
        return tuple(terms)

    return _forward


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    out, seed, lambda_second = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    NAIGNStep._forward = with_second_pull(lambda_second)
    config = dict(out=out, seed=seed, steps=2000, sample_every=500, checkpoint_every=500, progress=False,
                  lambda_imle=4.0, lambda_restore=0.5, restore_corruptions="noise", lr=2e-3, candidates=16,
                  refresh_every=8)
    config.update({key: parse(value) for key, value in (kv.split("=", 1) for kv in sys.argv[4:])})
    Trainer(TrainConfig(**config)).fit()


if __name__ == "__main__":
    main()
