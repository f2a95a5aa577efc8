"""Trained runs sampled from a mixture prior fitted to the training digits (issue 14, docs/NAIGN.md "A mixture
prior to sample from").

For each K:R:N: ign_fast.noise.MixturePrior.fit(the 4,000 MNIST-5k training digits, K components, rank R), then
f^N(z) for z from it, 5,000 samples, scored by `ign-fast eval`'s metrics (evaluate_digits) on three noise draws
(seeds 0, 1, 2) of every run given. N = 0 scores the prior's own samples (clamped to [-1, 1]). train:N samples
each run's training prior instead (the gaussian noise it was trained from, whatever it samples from now). The runs keep
their own weights (EMA) and are applied as Projector applies them (batch statistics for a BatchNorm model), so
any digit run can be read, whatever prior it was trained from.

    python experiments/mixture_sampling.py RUN[,RUN...] K:R:N|train:N [...]
    python experiments/mixture_sampling.py runs/demo train:1 64:16:1 64:16:0 32:8:1 64:16:2

One line per K:R:N: the mean FID of each run (over the three draws), their mean, and the means of precision,
recall, classifier confidence, copy share and median novelty ratio (see ign_fast.metrics.novelty), the
smallest class share seen, and each run's count of classes at >= 5% (the fewest over its three draws).
"""
import argparse

import torch

from ign_fast import Projector
from ign_fast.checkpoint import load_checkpoint
from ign_fast.data import load_mnist5k
from ign_fast.metrics import evaluate_digits, load_digit_classifier
from ign_fast.noise import MixturePrior, build_prior


def setting(text):
    parts = text.split(":")
    if len(parts) == 2 and parts[0] == "train" and parts[1].isdigit():
        return ("train", None, int(parts[1]))
    if len(parts) != 3 or not all(p.isdigit() for p in parts) or int(parts[0]) < 1 or int(parts[1]) < 1:
        raise argparse.ArgumentTypeError(f"expected K:R:N (components, rank, applications of f) or train:N, got "
                                         f"{text!r}")
    return tuple(int(p) for p in parts)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", help="run folders, comma-separated")
    parser.add_argument("settings", nargs="+", type=setting, metavar="K:R:N")
    args = parser.parse_args()
    projectors, training_priors = [], []
    for run in args.runs.split(","):
        try:
            projector = Projector.load(run)
            state = load_checkpoint(run)
            training_priors.append(build_prior(state["meta"]["prior_config"], state_dict=state["prior"]))
        except (OSError, ValueError, RuntimeError) as error:  # a missing or unreadable run: one line
            parser.error(f"runs: {error}")
        if tuple(projector.input_shape) != (1, 28, 28) or projector.num_classes is not None:
            parser.error(f"runs: {run} is not an unconditional digit model (1x28x28)")
        projectors.append(projector)
    torch.set_grad_enabled(False)
    train = load_mnist5k("train")[0]
    classifier = load_digit_classifier()
    for components, rank, steps in args.settings:
        mixture = MixturePrior.fit(train, components, rank) if components != "train" else None
        reports, per_run, covered = [], [], []
        for projector, training_prior in zip(projectors, training_priors):
            prior = mixture or training_prior
            fids = []
            for seed in (0, 1, 2):
                generator = torch.Generator().manual_seed(seed)

                def generate(n):
                    z = prior.sample(n, generator=generator)
                    return projector._apply(z, steps) if steps else z.clamp(-1, 1)

                reports.append(evaluate_digits(generate, classifier=classifier))
                fids.append(reports[-1]["fid"])
            per_run.append(sum(fids) / 3)
            covered.append(min(r["mode_coverage"]["classes_covered"] for r in reports[-3:]))

        def mean(read):
            return sum(read(r) for r in reports) / len(reports)

        smallest = min(min(r["mode_coverage"]["histogram"]) for r in reports)
        name = "training prior" if mixture is None else f"K {components} R {rank}"
        print(f"{name} f^{steps}: FID per run {' / '.join(f'{v:.2f}' for v in per_run)}, "
              f"mean {mean(lambda r: r['fid']):.2f}; precision {mean(lambda r: r['prdc']['precision']):.3f} "
              f"recall {mean(lambda r: r['prdc']['recall']):.3f} confidence {mean(lambda r: r['confidence']):.3f} "
              f"copy share {100 * mean(lambda r: r['novelty']['copy_share']):.2f}% "
              f"median ratio {mean(lambda r: r['novelty']['median_ratio']):.3f} "
              f"smallest class {100 * smallest:.1f}%; classes at >= 5% per run (fewest over draws) "
              f"{' / '.join(map(str, covered))}", flush=True)


if __name__ == "__main__":
    main()
