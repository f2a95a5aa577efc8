"""Trainer step time of the pulls in experiments/naign_pulls.py that add work to a step, against make demo's
plain NAIGN step (issue 14, docs/NAIGN.md "f(z) draws from about eight directions").

The trainers live in one process, each with its step's forward replaced by the variant's (on the instance), and
are timed in alternating rounds, so machine load hits them alike; the report is the median per-step time of each
and its ratio to the plain step. Before timing, every warm-up step must have produced finite losses.

  OMP_NUM_THREADS=1 python benchmarks/bench_pulls.py [--rounds 4 --steps 24]
"""
import argparse
import math
import os
import sys
import tempfile
import types

import torch

from ign_fast.trainer import TrainConfig, Trainer

from common import print_step_rounds, trainer_step_rounds  # benchmarks/, next to this file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "experiments"))
import naign_pulls  # noqa: E402


def variants():
    """name -> the forward that replaces NAIGNStep._forward (None: the plain step)."""
    return {
        "plain (make demo's step)": None,
        "code 0.1": naign_pulls.with_extra_term(lambda s, x, z, c: naign_pulls.code_pull(s, x, z, c, 0.1)),
        "random_ign 1": naign_pulls.random_ign_forward(1.0, 0.0),
        "random_ign 1 --tight 0.125": naign_pulls.random_ign_forward(1.0, 0.125),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=24, help="steps per round and trainer")
    args = parser.parse_args()
    if args.rounds < 1 or args.steps < 1:
        parser.error(f"--rounds and --steps must be >= 1, got {args.rounds} and {args.steps}")
    torch.set_num_threads(1)
    trainers = {}
    for name, forward in variants().items():
        out = os.path.join(tempfile.mkdtemp(), "run")
        trainer = Trainer(TrainConfig(out=out, steps=10 ** 6, progress=False, sample_every=10 ** 6,
                                      checkpoint_every=10 ** 6, **naign_pulls.DEMO))
        if forward is not None:
            trainer.step_fn._forward = types.MethodType(forward, trainer.step_fn)
        for _ in range(2 * naign_pulls.DEMO["refresh_every"]):  # at least two pool refreshes
            terms = trainer.train_step()
            assert all(math.isfinite(v) for v in terms.values()), (name, terms)
        trainers[name] = trainer
    print_step_rounds(trainer_step_rounds(trainers, args.rounds, args.steps), lambda name: name)


if __name__ == "__main__":
    main()
