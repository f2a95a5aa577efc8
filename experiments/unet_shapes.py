"""The U-Net on 64x64 colour images streamed from a folder, end to end (issue 15's longer run).

No RGB image set ships with a package this project may use, so the script generates one whose content is known:
one filled shape (disc, square or triangle) in one of six colours, at a random place and size, on a dark
background. It writes the training images as PNG files, trains NAIGN with `--model unet --data images`
through the trainer (EMA on, the default), saves a grid of samples, and measures precision / recall /
density / coverage (k = 5) of 1,000 samples against 1,000 held-out images on 16x16 average-pooled pixels,
next to the same numbers for held-out against training images (what a perfect generator would score).

  python experiments/unet_shapes.py --steps 600 --out runs/unet_shapes --figure docs/figures/unet_shapes_samples.png
"""
import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

COLOURS = np.array([[230, 60, 50], [60, 200, 80], [70, 110, 240], [240, 210, 60], [200, 80, 220], [240, 240, 240]],
                   dtype=np.uint8)


def make_shapes(n, size, seed):
    """uint8 [n, size, size, 3]: one filled disc, square or triangle per image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    images = np.full((n, size, size, 3), 16, dtype=np.uint8)
    for i in range(n):
        kind, colour = rng.integers(3), COLOURS[rng.integers(len(COLOURS))]
        r = rng.uniform(0.12, 0.25) * size
        cx, cy = rng.uniform(r, size - r, size=2)
        if kind == 0:
            inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        elif kind == 1:
            inside = (np.abs(xx - cx) <= r * 0.85) & (np.abs(yy - cy) <= r * 0.85)
        else:  # an upward triangle: below the two slanted edges, above the base
            inside = (yy <= cy + r * 0.8) & (yy >= cy - r + 2 * np.abs(xx - cx) * 1.0)
        images[i][inside] = colour
    return images


def pooled(images):
    """[N, 3, S, S] in [-1, 1] -> [N, 3*16*16] features."""
    return F.adaptive_avg_pool2d(images.float(), 16).flatten(1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default="runs/unet_shapes")
    parser.add_argument("--figure", default=None, help="also copy the sample grid here")
    args = parser.parse_args()

    from PIL import Image

    from ign_fast import metrics
    from ign_fast.images import save_image_grid
    from ign_fast.inference import Projector
    from ign_fast.trainer import TrainConfig, Trainer

    folder = os.path.join(args.out, "images")
    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(make_shapes(args.train, args.size, seed=0)):
        Image.fromarray(image).save(os.path.join(folder, f"{i:05d}.png"))
    heldout = torch.from_numpy(make_shapes(1000, args.size, seed=1)).permute(0, 3, 1, 2).float() / 127.5 - 1
    train = torch.from_numpy(make_shapes(1000, args.size, seed=0)).permute(0, 3, 1, 2).float() / 127.5 - 1

    config = TrainConfig(objective="naign", data="images", data_root=folder, image_size=args.size, model="unet",
                         width=args.width, model_kwargs={"depth": 4}, batch_size=args.batch_size, candidates=4,
                         steps=args.steps, out=os.path.join(args.out, "run"), progress=False,
                         log_every=max(args.steps // 20, 1), sample_every=args.steps, checkpoint_every=args.steps)
    trainer = Trainer(config, overwrite=True)
    start = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - start

    projector = Projector.load(config.out)
    samples = torch.cat([projector.generate(250, seed=s) for s in range(4)])
    grid = os.path.join(args.out, "samples.png")
    save_image_grid(samples[:64], grid, nrow=8)
    if args.figure:
        save_image_grid(samples[:64], args.figure, nrow=8)
    real = pooled(heldout)
    generated = metrics.prdc(real, pooled(samples))
    reference = metrics.prdc(real, pooled(train))
    row = {"steps": args.steps, "seconds": round(seconds), "steps_per_s": round(args.steps / seconds, 2),
           "samples": {k: round(v, 3) for k, v in generated.items()},
           "train_as_samples": {k: round(v, 3) for k, v in reference.items()}}
    print(json.dumps(row, indent=2))
    with open(os.path.join(args.out, "result.json"), "w") as f:
        json.dump(row, f, indent=2)
    print(f"grid: {grid}")


if __name__ == "__main__":
    main()
