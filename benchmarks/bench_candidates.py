"""Trainer step time of NAIGN for different candidates per data point k, pool refresh intervals R, candidate
chunks and idempotence weights (docs/NAIGN.md, issue 14).

The trainers (the demo's configuration otherwise) live in one process and are timed in alternating rounds, so
machine load hits them alike; the report is the median per-step time of each and its ratio to the first. Before
timing, every warm-up step must have produced finite losses.

  OMP_NUM_THREADS=1 python benchmarks/bench_candidates.py [--rounds 4 --steps 24]            # k 8 against 16
  OMP_NUM_THREADS=1 python benchmarks/bench_candidates.py --demo-recipe --configs 8:4:1024 16:8:1024 16:8
      # make demo's pool settings, old and new, with f over the candidates in chunks of 1,024 (before) and as the
      # step chooses (256 on a CPU)
  OMP_NUM_THREADS=1 python benchmarks/bench_candidates.py --demo-recipe --configs 16:8 16:8:auto:0.25
      # make demo's step without and with the idempotence term (λ_idem 0.25: one more f on the pulled samples)
  OMP_NUM_THREADS=1 python benchmarks/bench_candidates.py --demo-recipe --configs 16:8 --amp none bf16
      # make demo's step in float32 and under bf16 autocast (--amp bf16; fast on a CPU with AMX)
  OMP_NUM_THREADS=1 python benchmarks/bench_candidates.py --demo-recipe --configs 16:8 --widths 32 64
      # make demo's step with the DCGAN at width 32 (the default) and 64
"""
import argparse
import math
import os
import tempfile

import torch

from ign_fast.trainer import TrainConfig, Trainer

from common import print_step_rounds, trainer_step_rounds  # benchmarks/, next to this file

# the Makefile's DEMO_FLAGS that change the work of a step (the learning rate does not)
DEMO_RECIPE = dict(lambda_imle=4.0, lambda_restore=0.5, restore_corruptions="noise")


def parse_config(text):
    """K:R[:CHUNK[:IDEM]] -> (k, r, chunk or None, λ_idem); CHUNK "auto" (or absent): the step's choice."""
    parts = text.split(":")
    try:
        if len(parts) not in (2, 3, 4):
            raise ValueError
        k, r = int(parts[0]), int(parts[1])
        chunk = None if len(parts) < 3 or parts[2] == "auto" else int(parts[2])
        idem = float(parts[3]) if len(parts) == 4 else 0.0
    except ValueError:
        raise argparse.ArgumentTypeError(f"a configuration is K:R[:CHUNK[:IDEM]] (candidates:refresh-every:candidate "
                                         f"chunk or auto:idempotence weight), got {text!r}")
    if min(k, r) < 1 or (chunk is not None and chunk < 1) or not (math.isfinite(idem) and idem >= 0):
        raise argparse.ArgumentTypeError(f"K, R and CHUNK must be >= 1 and IDEM a number >= 0, got {text!r}")
    return k, r, chunk, idem


def describe(k, r, chunk, idem, amp="none", width=32):
    return (f"k = {k:2d}, R = {r:2d}, chunk {chunk or 'auto'}" + (f", λ_idem {idem:g}" if idem else "")
            + (f", amp {amp}" if amp != "none" else "") + (f", width {width}" if width != 32 else ""))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=24, help="steps per round and trainer")
    parser.add_argument("--configs", type=parse_config, nargs="+", default=[(8, 4, None, 0.0), (16, 4, None, 0.0)],
                        help="K:R[:CHUNK[:IDEM]], candidates per data point, steps between pools, the candidates f "
                             "makes at once (default or auto: the step's choice) and λ_idem (default 0); "
                             "default 8:4 16:4")
    parser.add_argument("--demo-recipe", action="store_true",
                        help="with make demo's λ_imle 4 and noise restoration term (default: train's defaults)")
    parser.add_argument("--amp", nargs="+", default=["none"], choices=("none", "bf16"),
                        help="time every configuration under each of these --amp settings (default none)")
    parser.add_argument("--widths", type=int, nargs="+", default=[32],
                        help="time every configuration with the model at each of these --width (default 32)")
    args = parser.parse_args()
    if min(args.widths) < 1:
        parser.error(f"--widths must be positive integers, got {args.widths}")
    torch.set_num_threads(1)
    extra = DEMO_RECIPE if args.demo_recipe else {}
    trainers = {}
    runs = [(config, amp, width) for config in args.configs for amp in args.amp for width in args.widths]
    for (k, r, chunk, idem), amp, width in runs:
        out = os.path.join(tempfile.mkdtemp(), "run")
        trainer = Trainer(TrainConfig(out=out, candidates=k, refresh_every=r, lambda_idem=idem, steps=10 ** 6,
                                      progress=False, sample_every=10 ** 6, checkpoint_every=10 ** 6, amp=amp,
                                      width=width, **extra))
        trainer.step_fn.candidate_chunk = chunk
        for _ in range(2 * r):  # at least two pool refreshes
            terms = trainer.train_step()
            assert all(math.isfinite(v) for v in terms.values()), (k, r, chunk, idem, terms)
            assert (terms["idem"] > 0) == (idem > 0), (idem, terms)  # the term is computed exactly when asked
        trainers[k, r, chunk, idem, amp, width] = trainer
    print_step_rounds(trainer_step_rounds(trainers, args.rounds, args.steps), lambda key: describe(*key))


if __name__ == "__main__":
    main()
