"""How long an average of the weights the demo's samples want (issue 14, docs/NAIGN.md "f(z) draws from about
eight directions").

The trainer's EMA warms up as min(decay, (1 + t) / (10 + t)): at the demo's 2,000 steps its decay is 0.9955, an
average over about the last 220 steps, whatever --ema-decay says. This trains the demo's recipe once and keeps,
beside the trainer's own EMA, power-function averages (Karras et al., "Analyzing and Improving the Training
Dynamics of Diffusion Models", 2024): decay (1 - 1/t)^(γ+1) at update t, an average over about the last
t / (γ + 1) steps at every point of training, so a smaller γ averages longer. Each is written as a copy of the
run whose final checkpoint holds that average as its EMA weights, RUN_powG, for `ign-fast eval`.

    python experiments/ema_windows.py RUN SEED [--gammas 1 2 4] [--set field=value ...]
    ign-fast eval RUN_pow2 --seed 0
"""
import argparse
import os
import shutil

from safetensors.torch import save_file

from ign_fast import checkpoint as ckpt
from ign_fast.ema import EMA
from ign_fast.trainer import Trainer, TrainConfig
from naign_pulls import DEMO, training_config  # the demo's recipe and --set, as the pulls train them


class PowerEMA(EMA):
    """EMA whose decay at update t (counting from 1) is (1 - 1/t)^(γ+1): the first update copies the weights."""

    def __init__(self, model, gamma):
        super().__init__(model, 0.5)
        self.gamma = float(gamma)

    def current_decay(self):
        return (1.0 - 1.0 / (self.updates + 1)) ** (self.gamma + 1.0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out")
    parser.add_argument("seed", type=int)
    parser.add_argument("--gammas", type=float, nargs="+", default=[1.0, 2.0, 4.0],
                        help="power-EMA exponents γ > 0 (default 1 2 4)")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="more TrainConfig fields")
    args = parser.parse_args()
    if any(g <= 0 for g in args.gammas):
        parser.error(f"--gammas must be positive, got {args.gammas}")
    config = training_config(parser, DEMO, args.out, args.seed, args.set)
    targets = [f"{args.out}_pow{g:g}" for g in args.gammas]
    for target in targets:
        if os.path.exists(target):
            parser.error(f"{target} exists: pass another OUT")
    try:
        trainer = Trainer(TrainConfig(**config))
    except (ValueError, TypeError) as error:  # a used run folder, a bad --set value: one line
        parser.error(str(error))
    if trainer.ema is None:
        parser.error("needs the trainer's EMA on (ema_decay), to compare with")
    averages = [PowerEMA(trainer.model, g) for g in args.gammas]
    own_update = trainer.ema.update

    def update(model):  # every average sees the same updates as the trainer's own (skipped steps skip all)
        own_update(model)
        for average in averages:
            average.update(model)

    trainer.ema.update = update
    trainer.fit()
    trainer.close()
    final = ckpt.resolve_checkpoint(args.out)
    for gamma, average, target in zip(args.gammas, averages, targets):
        shutil.copytree(args.out, target)
        save_file({k: v.contiguous() for k, v in average.state_dict().items()},
                  os.path.join(target, os.path.relpath(final, args.out), ckpt.EMA_FILE))
        print(f"γ {gamma:g}: final decay {average.current_decay():.5f} (the trainer's "
              f"{trainer.ema.current_decay():.5f}); run {target}")


if __name__ == "__main__":
    main()
