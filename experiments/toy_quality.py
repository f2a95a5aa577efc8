"""Why NAIGN's eight-gaussian samples lie between the modes, and what fixes it (issue 14, toy sets).

Trains NAIGN on a toy set with the trainer for each setting given, then measures on 5,000 samples the share of
modes covered and the high-quality share (samples within TOY_RADIUS of a mode) for f(z), f(f(z)), f^3(z) and
f^5(z): refinement by applying f again is the IGN way of moving a sample onto the manifold.

  python experiments/toy_quality.py --data 8gaussians --steps 600 2000 --set lr=5e-4 --set lr=2e-3 \
      --set hidden=512 --out runs/toy_quality
"""
import argparse
import json
import os
import time

import torch

from ign_fast import metrics
from ign_fast.data import TOY_MODES, toy_curve
from ign_fast.inference import apply_f
from ign_fast.trainer import TrainConfig, Trainer

# 3 x each set's noise: mode std 0.2 / 0.1; moons and rings: 0.05 off their curve, whose 2 x 12 equal-share
# arcs (data.toy_curve) are counted as the modes
TOY_RADIUS = {"trimodal": 0.6, "8gaussians": 0.5, "moons": 0.15, "rings": 0.15}


def coverage(samples, data):
    """(modes or arcs covered, high-quality share) of samples of the toy set `data`."""
    if data in TOY_MODES:
        cov = metrics.toy_mode_coverage(samples, TOY_MODES[data], TOY_RADIUS[data])
        return cov["modes_covered"], cov["high_quality"]
    cov = metrics.toy_curve_coverage(samples, *toy_curve(data), TOY_RADIUS[data])
    return cov["arcs_covered"], cov["high_quality"]
REFINE = (1, 2, 3, 5)


def parse_setting(text):
    """'lr=2e-3,candidates=16' -> {"lr": 0.002, "candidates": 16}; 'hidden'/'depth' go to the MLP."""
    values = {}
    for part in filter(None, text.split(",")):
        key, value = part.split("=")
        values[key] = json.loads(value)
    return values


def run(data, steps, setting, out, seed):
    model_kwargs = {k: setting.pop(k) for k in ("hidden", "depth") if k in setting}
    config = TrainConfig(objective="naign", data=data, model="mlp", steps=steps, out=out, progress=False,
                         sample_every=steps, checkpoint_every=steps, log_every=max(steps // 10, 1), seed=seed,
                         model_kwargs=model_kwargs or None, **setting)
    trainer = Trainer(config, overwrite=True)
    start = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - start
    z = trainer.prior.sample(5000, generator=torch.Generator().manual_seed(1)).to(trainer.device)
    row = {"seconds": round(seconds, 1)}
    for n in REFINE:
        covered, high_quality = coverage(apply_f(trainer.model, z, n).cpu(), data)
        row[f"f^{n}"] = (round(covered, 2), round(high_quality, 2))
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="8gaussians", choices=sorted(TOY_RADIUS))
    parser.add_argument("--steps", type=int, nargs="+", default=[600])
    parser.add_argument("--set", action="append", default=[], help="a setting, e.g. lr=2e-3,candidates=16")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default="runs/toy_quality")
    args = parser.parse_args()
    settings = args.set or [""]
    torch.set_num_threads(1)
    print("| data | steps | setting | seed | seconds | " + " | ".join(f"f^{n}: modes (arcs) / HQ" for n in REFINE)
          + " |")
    print("|---|---|---|---|---|" + "---|" * len(REFINE))
    for steps in args.steps:
        for text in settings:
            for seed in args.seeds:
                out = os.path.join(args.out, f"{args.data}-{steps}-{text or 'default'}-{seed}".replace(",", "_"))
                row = run(args.data, steps, parse_setting(text), out, seed)
                cells = " | ".join(f"{m:.2f} / {q:.2f}" for m, q in (row[f"f^{n}"] for n in REFINE))
                print(f"| {args.data} | {steps} | {text or 'defaults'} | {seed} | {row['seconds']} | {cells} |",
                      flush=True)


if __name__ == "__main__":
    main()
