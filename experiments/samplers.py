"""Other ways to draw samples from one trained run, scored as `ign-fast eval` scores f(z) (issue 14,
docs/NAIGN.md "What holds FID up").

Each row draws 5,000 digits and reports digit FID, precision / recall / density (PRDC, k 5) against the 1,000
held-out MNIST-5k digits, and the smallest class share:
- f(z) (what `ign-fast eval RUN --seed S` reports: the same noise) and f(f(z));
- f(τz), the prior's noise scaled by τ (the truncation trick of GANs);
- f(z) kept where f is most nearly idempotent: the 5,000 of a larger pool with the smallest mean |f(f(z)) - f(z)|
  (rejection by the distance field NAIGN reads off f);
- f(f(z) + σε), repeated: noise added to a sample and projected again (f was trained to undo noise where the run
  has the restoration term).

    python experiments/samplers.py runs/demo [--seed 0]
"""
import argparse

import torch

from ign_fast import Projector
from ign_fast.data import load_mnist5k
from ign_fast.metrics import _classifier_outputs, frechet_distance, load_digit_classifier, prdc

N, CHUNK = 5000, 500


def chunked(fn, x):
    return torch.cat([fn(x[i:i + CHUNK]) for i in range(0, x.shape[0], CHUNK)])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="a run folder or checkpoint (EMA weights where the run kept them)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0, as ign-fast eval)")
    args = parser.parse_args()
    try:
        projector = Projector.load(args.run)
    except (OSError, ValueError, RuntimeError) as error:  # a missing or unreadable run: one line, no traceback
        parser.error(f"run: {error}")
    if projector.prior_kind == "none" or projector.num_classes is not None or getattr(projector, "prior", None) is None:
        parser.error("run: needs a training run or checkpoint of an unconditional model with a prior (what "
                     "`ign-fast eval` scores), not an exported file or a conditional run")
    if tuple(projector.input_shape) != (1, 28, 28):
        parser.error(f"run: scores digit models (1x28x28); this one's data has shape {tuple(projector.input_shape)}")
    torch.set_grad_enabled(False)
    classifier = load_digit_classifier()
    heldout, _ = load_mnist5k("test")
    held_feats, _ = _classifier_outputs(classifier, heldout, CHUNK)

    def score(name, samples):
        feats, logits = _classifier_outputs(classifier, samples, CHUNK)
        shares = torch.bincount(logits.argmax(1), minlength=10).float() / logits.shape[0]
        r = prdc(held_feats, feats, k=5)
        print(f"{name:44s} FID {frechet_distance(feats, held_feats):6.2f}  P/R/D {r['precision']:.2f}/"
              f"{r['recall']:.2f}/{r['density']:.2f}  smallest class {shares.min().item():.3f}", flush=True)

    f = lambda x: projector._apply(x, 1)  # noqa: E731  (noise in, not images: no [-1, 1] check)
    generator = torch.Generator().manual_seed(args.seed)  # drawn as `ign-fast eval --seed` draws: its f(z) first
    z = torch.cat([projector.prior.sample(CHUNK, generator=generator) for _ in range(0, 3 * N, CHUNK)])
    fz = chunked(f, z)
    ffz = chunked(f, fz)
    score("f(z)", fz[:N])
    score("f(f(z))", ffz[:N])
    for tau in (0.7, 0.85, 1.15):
        score(f"f({tau} z)", chunked(f, tau * z[:N]))
    error = (ffz - fz).abs().flatten(1).mean(1)
    for pool in (2 * N, 3 * N):
        keep = error[:pool].argsort()[:N]
        score(f"f(z), the most idempotent {N} of {pool}", fz[keep])
    generator = torch.Generator().manual_seed(args.seed + 1_000_003)  # not the stream z came from
    for sigma in (0.2, 0.5):
        x = fz[:N]
        for rounds in (1, 2):
            x = chunked(lambda y: f(y + sigma * torch.randn(y.shape, generator=generator)), x)
            score(f"f(f(z) + {sigma}ε), {rounds} time{'s' if rounds > 1 else ''}", x)


if __name__ == "__main__":
    main()
