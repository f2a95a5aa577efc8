"""How often NAIGN's nearest-neighbour search in a class-conditional run matches a data point with a candidate
of its own label (docs/CONDITIONAL.md). The search sees the label planes: a candidate of another class is
2·H·W further away (l1) than on the image alone. This replays the search of training on a run's checkpoint:
pools of k·B noise with balanced labels, candidates f(z̃) made with the trained (not EMA) weights as the step
makes them, every training digit searched in batches of B; prints the share of matches with the data point's
label, and the same share had the search seen the image channels only.

    python experiments/conditional_nn_match.py runs/cond 32     # run folder, pools of 8 x 64 (default 8)
"""
import sys

import torch

from ign_fast import ops
from ign_fast.conditional import balanced_labels, condition
from ign_fast.data import load_mnist5k
from ign_fast.inference import load_trained
from ign_fast.naign import generate_candidates


def main(run, pools=8, batch=64, candidates=8, seed=0):
    model, prior, meta = load_trained(run, "cpu", ema=False)
    k, c = model.num_classes, model.image_channels
    images, labels = load_mnist5k("train")
    generator = torch.Generator().manual_seed(seed)
    matched = matched_image_only = searched = 0
    for _ in range(pools):
        n = candidates * batch
        pool_labels = balanced_labels(n, k, generator)
        pool = condition(prior.sample(n, generator=generator), pool_labels, k)
        cands = generate_candidates(model.train(), pool)  # as in training: train-mode, buffers untouched
        pick = torch.randperm(images.shape[0], generator=generator)[:batch]
        x = condition(images[pick], labels[pick], k)
        index, _ = ops.nearest_neighbors(x, cands, "l1")
        matched += int((pool_labels[index] == labels[pick]).sum())
        index_image, _ = ops.nearest_neighbors(x[:, :c].contiguous(), cands[:, :c].contiguous(), "l1")
        matched_image_only += int((pool_labels[index_image] == labels[pick]).sum())
        searched += batch
    print(f"{run}: {searched} data points searched among {candidates}x{batch} candidates per pool")
    print(f"  matched candidate has the data point's label: {matched / searched:.4f} (search with label planes)")
    print(f"  the same, had the search seen the image only:  {matched_image_only / searched:.4f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/cond", int(sys.argv[2]) if len(sys.argv) > 2 else 8)
