"""How many directions of its code f's samples use (issue 14, docs/NAIGN.md "f(z) draws from about eight
directions").

For a run whose model is an autoencoder (encode, decode; DCGAN28), the covariance of its codes of the prior's
noise, encode(z), against that of its codes of the real training digits: the largest eigenvalues, and the
participation ratio (sum λ)² / sum λ², about how many directions carry the variance. Then the digit FID, precision
/ recall (PRDC, k 5) and the classifier's mean confidence of decode(codes of noise) with each code projected onto
its top-k principal directions (k = 4, 8, 16, 32, all): where FID stops moving, the samples use no more
directions. Against the 1,000 held-out MNIST-5k digits, on the package's classifier, the EMA weights, 5,000
samples of noise seed 0 (`ign-fast eval`'s draw).

    python experiments/code_spread.py runs/demo
"""
import argparse

import torch

from ign_fast import Projector
from ign_fast.data import load_mnist5k
from ign_fast.metrics import _classifier_outputs, frechet_distance, load_digit_classifier, prdc

N, CHUNK = 5000, 500


def participation_ratio(eigenvalues):
    return (eigenvalues.sum() ** 2 / eigenvalues.square().sum()).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="a run folder or checkpoint of an unconditional digit autoencoder")
    args = parser.parse_args()
    try:
        projector = Projector.load(args.run)
    except (OSError, ValueError, RuntimeError) as error:  # a missing or unreadable run: one line, no traceback
        parser.error(f"run: {error}")
    model = getattr(projector, "model", None)
    if not (hasattr(model, "encode") and hasattr(model, "decode")) or getattr(projector, "prior", None) is None:
        parser.error("run: needs a training run of a model with encode and decode (DCGAN28), not "
                     f"{type(model).__name__ if model is not None else 'an exported file'}")
    if tuple(projector.input_shape) != (1, 28, 28) or projector.num_classes is not None:
        parser.error("run: needs an unconditional digit model (1x28x28)")
    torch.set_grad_enabled(False)
    classifier = load_digit_classifier()
    held_feats, _ = _classifier_outputs(classifier, load_mnist5k("test")[0], CHUNK)
    train, _ = load_mnist5k("train")
    generator = torch.Generator().manual_seed(0)
    z = torch.cat([projector.prior.sample(CHUNK, generator=generator) for _ in range(0, N, CHUNK)])
    encode = lambda x: torch.cat([model.encode(x[i:i + CHUNK]) for i in range(0, x.shape[0], CHUNK)])  # noqa: E731
    noise_codes, digit_codes = encode(z), encode(train)
    shape = noise_codes.shape[1:]
    noise_codes, digit_codes = noise_codes.flatten(1).double(), digit_codes.flatten(1).double()
    noise_eigenvalues, directions = torch.linalg.eigh(torch.cov(noise_codes.T))  # ascending: flipped below
    noise_eigenvalues, directions = noise_eigenvalues.flip(0), directions.flip(1)
    digit_eigenvalues = torch.linalg.eigvalsh(torch.cov(digit_codes.T)).flip(0)
    for name, eigenvalues in (("codes of noise", noise_eigenvalues), ("codes of training digits", digit_eigenvalues)):
        print(f"{name:26s} participation ratio {participation_ratio(eigenvalues):5.1f}; total variance "
              f"{eigenvalues.sum():7.1f}; largest eigenvalues " + " ".join(f"{v:.0f}" for v in eigenvalues[:10]))
    print(f"distance between the two mean codes {(noise_codes.mean(0) - digit_codes.mean(0)).norm():.1f}; "
          f"mean code norms {noise_codes.norm(dim=1).mean():.1f} (noise) and {digit_codes.norm(dim=1).mean():.1f} "
          "(digits)")

    def score(name, images):
        feats, logits = _classifier_outputs(classifier, images, CHUNK)
        r = prdc(held_feats, feats, k=5)
        print(f"{name:44s} FID {frechet_distance(feats, held_feats):6.2f}  P/R {r['precision']:.2f}/"
              f"{r['recall']:.2f}  confidence {logits.softmax(1).max(1).values.mean():.3f}", flush=True)

    score("real training digits", train)
    mean = noise_codes.mean(0)
    for k in (4, 8, 16, 32, noise_codes.shape[1]):
        top = directions[:, :k]
        codes = (mean + (noise_codes - mean) @ top @ top.T).float().view(-1, *shape)
        images = torch.cat([model.decode(codes[i:i + CHUNK]) for i in range(0, N, CHUNK)])
        label = "f(z) = decode(encode(z))" if k == noise_codes.shape[1] else f"decode(code on its top {k} directions)"
        score(label, images)


if __name__ == "__main__":
    main()
