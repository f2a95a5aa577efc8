"""Trainer step time of NAIGN for different candidates per data point k and pool refresh intervals R
(docs/NAIGN.md, issue 14).

The trainers (the demo's configuration otherwise) live in one process and are timed in alternating rounds, so
machine load hits them alike; the report is the median per-step time of each and its ratio to the first. Before
timing, every warm-up step must have produced finite losses.

  OMP_NUM_THREADS=1 python benchmarks/bench_candidates.py [--rounds 4 --steps 24]            # k 8 against 16
  OMP_NUM_THREADS=1 python benchmarks/bench_candidates.py --demo-recipe --configs 8:4 16:8   # make demo, old/new
"""
import argparse
import math
import os
import statistics
import tempfile
import time

import torch

from ign_fast.trainer import TrainConfig, Trainer

# the Makefile's DEMO_FLAGS that change the work of a step (the learning rate does not)
DEMO_RECIPE = dict(lambda_imle=4.0, lambda_restore=0.5, restore_corruptions="noise")


def parse_config(text):
    try:
        k, r = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a configuration is K:R (candidates:refresh-every), got {text!r}")
    if k < 1 or r < 1:
        raise argparse.ArgumentTypeError(f"K and R must be >= 1, got {text!r}")
    return k, r


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=24, help="steps per round and trainer")
    parser.add_argument("--configs", type=parse_config, nargs="+", default=[(8, 4), (16, 4)],
                        help="K:R pairs, candidates per data point and steps between pools (default 8:4 16:4)")
    parser.add_argument("--demo-recipe", action="store_true",
                        help="with make demo's λ_imle 4 and noise restoration term (default: train's defaults)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    extra = DEMO_RECIPE if args.demo_recipe else {}
    trainers = {}
    for k, r in args.configs:
        out = os.path.join(tempfile.mkdtemp(), "run")
        trainers[k, r] = Trainer(TrainConfig(out=out, candidates=k, refresh_every=r, steps=10 ** 6, progress=False,
                                             sample_every=10 ** 6, checkpoint_every=10 ** 6, **extra))
        for _ in range(2 * r):  # at least two pool refreshes
            terms = trainers[k, r].train_step()
            assert all(math.isfinite(v) for v in terms.values()), (k, r, terms)
    times = {key: [] for key in trainers}
    for _ in range(args.rounds):
        for key, trainer in trainers.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                trainer.train_step()
            times[key].append((time.perf_counter() - start) / args.steps)
    first = next(iter(times))
    for (k, r), ts in times.items():
        ratio = statistics.median(ts) / statistics.median(times[first])
        print(f"k = {k:2d}, R = {r:2d}: ms per step by round " + ", ".join(f"{t * 1000:.1f}" for t in ts)
              + f"; median {statistics.median(ts) * 1000:.1f}, {ratio:.2f}x k = {first[0]}, R = {first[1]}")


if __name__ == "__main__":
    main()
