"""IGN against NAIGN on the 1-D tri-modal mixture, 2-D eight Gaussians and MNIST-5k.

Trains each objective with the trainer's defaults for that objective, then measures mode coverage (toy
modes; digit classes by the package's classifier), digit FID, precision/recall/density/coverage, novelty,
and the OOD AUROC of the drift score. Writes a markdown table (stdout and --table) and figures under --out.

  python experiments/compare_ign_naign.py --toy-steps 2000 --mnist-steps 700 --out runs/compare
"""
import argparse
import json
import os
import platform
import sys
import time

import torch

from ign_fast import metrics
from ign_fast.data import TOY_MODES, load_mnist5k
from ign_fast.inference import generate
from ign_fast.manifold import ood_report
from ign_fast.trainer import TrainConfig, Trainer

TOY_RADIUS = {"trimodal": 0.6, "8gaussians": 0.5}  # half the spacing of neighbouring modes, or less


def train(objective, data, steps, out, **extra):
    config = TrainConfig(objective=objective, data=data, steps=steps, out=out, progress=False,
                         sample_every=max(steps, 1), checkpoint_every=max(steps, 1), log_every=50, **extra)
    # each run of an experiment measures afresh: an earlier result in the same folder is replaced, not resumed
    trainer = Trainer(config, overwrite=True)
    start = time.perf_counter()
    trainer.fit()
    return trainer, time.perf_counter() - start


def samples_of(trainer, n, seed=0):
    with torch.no_grad():
        z = trainer.prior.sample(n, generator=torch.Generator().manual_seed(seed)).to(trainer.device)
        return generate(trainer.model, z).float().cpu()


def toy_row(objective, data, steps, out):
    trainer, seconds = train(objective, data, steps, os.path.join(out, f"{data}-{objective}"), model="mlp")
    samples = samples_of(trainer, 5000)
    cov = metrics.toy_mode_coverage(samples, TOY_MODES[data], TOY_RADIUS[data])
    try:
        from ign_fast import plots

        target = trainer.data[:5000]
        path = os.path.join(out, f"{data}-{objective}.png")
        if data == "trimodal":
            plots.save_histogram_1d(samples, target, path)
        else:
            plots.save_scatter_2d(samples, target, path)
            plots.save_distance_field(trainer.model, os.path.join(out, f"{data}-{objective}-field.png"))
    except ImportError:
        pass  # figures need matplotlib; the numbers do not
    return {"data": data, "objective": objective, "steps": steps, "seconds": seconds,
            "modes_covered": f"{cov['modes_covered']:.2f}", "high_quality": f"{cov['high_quality']:.2f}"}


def mnist_row(objective, steps, out, classifier):
    trainer, seconds = train(objective, "mnist5k", steps, os.path.join(out, f"mnist-{objective}"))

    def generate_fn(n, _seed=[0]):
        _seed[0] += 1
        return samples_of(trainer, n, seed=_seed[0])

    report = metrics.evaluate_digits(generate_fn, n=5000, classifier=classifier)
    heldout, _ = load_mnist5k("test")
    ood = ood_report(trainer.model, heldout.to(trainer.device), generator=torch.Generator().manual_seed(0))
    with open(os.path.join(out, f"mnist-{objective}.json"), "w") as f:
        json.dump({"eval": report, "ood": ood}, f, indent=2, default=float)
    prdc = report["prdc"]
    return {"data": "mnist5k", "objective": objective, "steps": steps, "seconds": seconds,
            "classes_covered": report["mode_coverage"]["classes_covered"],
            "kl_to_uniform": f"{report['mode_coverage']['kl_to_uniform']:.3f}",
            "digit_fid": f"{report['fid']:.2f}",
            "prdc": f"{prdc['precision']:.2f}/{prdc['recall']:.2f}/{prdc['density']:.2f}/{prdc['coverage']:.2f}",
            "confidence": f"{report['confidence']:.2f}",
            "copy_share": f"{report['novelty']['copy_share']:.3f}",
            "ood_auroc": "/".join(f"{ood[k]:.2f}" for k in ("gaussian_noise", "uniform_noise", "inverted",
                                                            "rotated_90"))}


def markdown(rows):
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[k]:.0f}" if k == "seconds" else str(r.get(k, "")) for k in keys) + " |")
    return "\n".join(lines)


def report(tables, path=None):
    """Print the tables under a line naming the machine and the command; also write them to path if given."""
    header = (f"machine: {platform.machine()} CPU, {torch.get_num_threads()} threads; torch {torch.__version__}; "
              f"command: python {' '.join(sys.argv)}")
    text = "\n\n".join([header, *tables])
    print(text)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--toy-steps", type=int, default=2000)
    parser.add_argument("--mnist-steps", type=int, default=700)
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--table", default=None, help="also write the markdown tables here")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    toy = [toy_row(obj, data, args.toy_steps, args.out) for data in ("trimodal", "8gaussians")
           for obj in ("ign", "naign")]
    classifier = metrics.load_digit_classifier()
    digits = [mnist_row(obj, args.mnist_steps, args.out, classifier) for obj in ("ign", "naign")]
    report([markdown(toy), markdown(digits)], args.table)


if __name__ == "__main__":
    main()
