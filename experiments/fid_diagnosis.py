"""Where a digit generator's FID comes from (issue 14, docs/NAIGN.md "What holds FID up").

Four readings on the package's classifier features, against the 1,000 held-out MNIST-5k digits:
- f(train) and f(held-out): the FID of the run's own reconstructions. Near the reference (real training digits,
  0.82) means the network can draw digits as sharp as the data; the gap left is in which digits f(z) draws.
- f(z): the FID `ign-fast eval` reports (5,000 samples, the same noise seed).
- f(z) resampled to the held-out digits' class shares (by the classifier's labels): how much of the FID is the
  classes' proportions rather than the digits within them.

Then, for the real training digits and for f(z): FID split into its two terms, |mean difference|^2 and the
covariance term (the rest); precision and recall (PRDC, k 5) against the held-out digits; and the per-pixel
standard deviation across the images (in [0, 1] ink), how much the digits vary.

    python experiments/fid_diagnosis.py runs/demo [--n 5000] [--pool 15000] [--seed 0]
"""
import argparse

import torch

from ign_fast import Projector
from ign_fast.data import load_mnist5k
from ign_fast.metrics import _classifier_outputs, frechet_distance, load_digit_classifier, prdc


def projected(projector, images, chunk=500):
    with torch.no_grad():
        return torch.cat([projector.project(images[i:i + chunk]) for i in range(0, images.shape[0], chunk)])


def class_balanced(labels, target_labels, n, generator):
    """Indices of n samples drawn class by class (without replacement while a class has enough) so that their
    class shares match target_labels'."""
    picks = []
    for c in range(10):
        want = int(round(n * (target_labels == c).float().mean().item()))
        pool = (labels == c).nonzero().flatten()
        if len(pool) == 0 or want == 0:
            continue
        if len(pool) >= want:
            picks.append(pool[torch.randperm(len(pool), generator=generator)[:want]])
        else:
            picks.append(pool[torch.randint(len(pool), (want,), generator=generator)])
    return torch.cat(picks)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="a run folder or checkpoint (EMA weights where the run kept them)")
    parser.add_argument("--n", type=int, default=5000, help="samples in each FID (default 5000, as ign-fast eval)")
    parser.add_argument("--pool", type=int, default=15000, help="samples drawn to resample by class from")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.pool < args.n:
        parser.error(f"--pool must be >= --n ({args.n}), got {args.pool}")

    try:
        projector = Projector.load(args.run)
    except (OSError, ValueError, RuntimeError) as error:  # a missing or unreadable run: one line, no traceback
        parser.error(f"run: {error}")
    if tuple(projector.input_shape) != (1, 28, 28) or projector.num_classes is not None:
        parser.error(f"run: needs an unconditional digit model (1x28x28); this one's data has shape "
                     f"{tuple(projector.input_shape)}" + (", class-conditional" if projector.num_classes else ""))
    classifier = load_digit_classifier()
    train, _ = load_mnist5k("train")
    heldout, _ = load_mnist5k("test")
    held_feats, held_logits = _classifier_outputs(classifier, heldout, 500)
    train_feats, _ = _classifier_outputs(classifier, train, 500)
    samples = torch.cat([projector.generate(min(500, args.pool - i), seed=args.seed + i)
                         for i in range(0, args.pool, 500)])
    sample_feats, sample_logits = _classifier_outputs(classifier, samples, 500)
    sample_labels, held_labels = sample_logits.argmax(1), held_logits.argmax(1)
    balanced = class_balanced(sample_labels, held_labels, args.n, torch.Generator().manual_seed(args.seed))

    rows = [
        ("real training digits (the reference)", frechet_distance(train_feats, held_feats)),
        ("f(training digits)", frechet_distance(_classifier_outputs(classifier, projected(projector, train), 500)[0],
                                                held_feats)),
        ("f(held-out digits)", frechet_distance(_classifier_outputs(classifier, projected(projector, heldout), 500)[0],
                                                held_feats)),
        (f"f(z), {args.n} samples", frechet_distance(sample_feats[:args.n], held_feats)),
        (f"f(z), {args.n} resampled to the held-out class shares", frechet_distance(sample_feats[balanced],
                                                                                    held_feats)),
    ]
    for name, fid in rows:
        print(f"{name:55s} FID {fid:6.2f}")
    shares = torch.bincount(sample_labels, minlength=10).float() / sample_labels.numel()
    print("f(z) class shares 0-9: " + " ".join(f"{s:.3f}" for s in shares.tolist()))
    fz = sample_feats[:args.n]
    for name, images, feats in (("real training digits", train, train_feats),
                                (f"f(z), {args.n} samples", samples[:args.n], fz)):
        mean_term = (feats.double().mean(0) - held_feats.double().mean(0)).square().sum().item()
        fid = frechet_distance(feats, held_feats)
        pr = prdc(held_feats, feats, k=5)
        spread = ((images + 1) / 2).flatten(1).std(0).mean().item()
        print(f"{name:30s} FID {fid:5.2f} = means {mean_term:4.2f} + covariances {fid - mean_term:4.2f}; "
              f"precision {pr['precision']:.2f} recall {pr['recall']:.2f}; per-pixel std {spread:.3f}")


if __name__ == "__main__":
    main()
