"""Trainer step time of NAIGN with k = 8 against k = 16 candidates per data point (docs/NAIGN.md, issue 14).

Both trainers (the demo's configuration otherwise) live in one process and are timed in alternating rounds, so
machine load hits both alike; the report is the median per-step time of each and their ratio. Before timing,
every warm-up step must have produced finite losses.

  OMP_NUM_THREADS=1 python benchmarks/bench_candidates.py [--rounds 4 --steps 24]
"""
import argparse
import math
import os
import statistics
import tempfile
import time

import torch

from ign_fast.trainer import TrainConfig, Trainer


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=24, help="steps per round and trainer")
    args = parser.parse_args()
    torch.set_num_threads(1)
    trainers = {}
    for k in (8, 16):
        out = os.path.join(tempfile.mkdtemp(), "run")
        trainers[k] = Trainer(TrainConfig(out=out, candidates=k, steps=10 ** 6, progress=False,
                                          sample_every=10 ** 6, checkpoint_every=10 ** 6))
        for _ in range(8):
            terms = trainers[k].train_step()
            assert all(math.isfinite(v) for v in terms.values()), (k, terms)
    times = {k: [] for k in trainers}
    for _ in range(args.rounds):
        for k, trainer in trainers.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                trainer.train_step()
            times[k].append((time.perf_counter() - start) / args.steps)
    for k, ts in times.items():
        print(f"k = {k:2d}: ms per step by round " + ", ".join(f"{t * 1000:.1f}" for t in ts))
    print(f"ratio k16 / k8 (medians): {statistics.median(times[16]) / statistics.median(times[8]):.2f}")


if __name__ == "__main__":
    main()
