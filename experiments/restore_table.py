"""The restoration table of docs/RESTORE.md: held-out MNIST-5k digits, each corruption x method, PSNR and SSIM
before and after, seconds, and one grid per row (clean / corrupted / restored, 16 digits). A colour model
(3x28x28, `--data mnist5k-color`) is measured on the held-out coloured digits, gray rows only.

usage: OMP_NUM_THREADS=1 python experiments/restore_table.py RUN [--n 256] [--out docs/figures/restore]
       [--only mask,down] [--prefix TAG_]
"""
import argparse
import json
import os
import time

import torch

from ign_fast.cli import _restore_problem, psnr, ssim_or_none
from ign_fast.data import class_colors, load_mnist5k, load_mnist5k_color
from ign_fast.images import image_grid, save_array_png, vstack
from ign_fast.inference import Projector
from ign_fast.restore import auto_method

ROWS = [  # (corruption, method, options)
    ("mask", "auto", {}), ("mask", "project", {}), ("mask", "consistent", {"steps": 2}), ("mask", "consistent", {}),
    ("mask", "latent", {}),
    ("mask", "latent", {"steps": 150, "starts": 4}),
    ("mask", "latent", {"steps": 150, "starts": 4, "combine": "mean"}),
    ("down", "project", {}), ("down", "consistent", {}), ("down", "latent", {}),
    ("down", "latent", {"steps": 150, "starts": 4}),
    ("noise", "project", {}), ("noise", "project", {"steps": 2}),
    ("sketch", "project", {}), ("sketch", "latent", {}), ("sketch", "latent", {"steps": 150, "starts": 4}),
]
COLOR_ROWS = [("gray", "auto", {}), ("gray", "project", {}), ("gray", "consistent", {"steps": 2}),
              ("gray", "consistent", {}), ("gray", "latent", {})]


def hue_accuracy(images, labels):
    """Share of images whose ink colour is nearest (in RGB direction) to their class's hue: whether a
    colorization gave each digit the colour of its class. Ink: the pixels brighter than the background."""
    rgb = (images.float().clamp(-1, 1) + 1) / 2
    weight = rgb.amax(1, keepdim=True)  # how much ink a pixel has, whatever its hue
    mean = (rgb * weight).flatten(2).sum(2) / weight.flatten(2).sum(2).clamp_min(1e-6)  # [N, 3]
    colors = class_colors()
    cos = torch.nn.functional.normalize(mean, dim=1) @ torch.nn.functional.normalize(colors, dim=1).T
    return float((cos.argmax(1) == labels).float().mean())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--out", default="docs/figures/restore")
    p.add_argument("--only", default="", help="comma-separated corruptions")
    p.add_argument("--options-only", action="store_true", help="only the rows with non-default options")
    p.add_argument("--methods", default="", help="comma-separated methods: only these rows")
    p.add_argument("--no-long", action="store_true", help="leave out the 150 x 4 latent rows")
    p.add_argument("--prefix", default="", help="prefix of the grid and table file names (one run's from another's)")
    args = p.parse_args()
    projector = Projector.load(args.run)
    color = projector.input_shape[0] == 3
    clean, labels = (load_mnist5k_color if color else load_mnist5k)("test")
    clean = clean[: args.n]
    results = []
    for corruption, method, options in COLOR_ROWS if color else ROWS:
        if args.only and corruption not in args.only.split(","):
            continue
        if args.options_only and not options:
            continue
        if (args.methods and method not in args.methods.split(",")) or (args.no_long and options.get("starts")):
            continue
        # seed 0 as `ign-fast restore` uses by default: the same masks and noise for every method
        op, y = _restore_problem(corruption, clean, torch.Generator().manual_seed(0), 2, 0.5)
        corrupted = op.corrupted_image(y)  # the black-filled masked input for masks (the baseline)
        start = time.perf_counter()
        restored = projector.restore(y, op, method=method, seed=0, **options)
        seconds = time.perf_counter() - start
        row = {"corruption": corruption, "method": method, "options": options, "n": args.n,
               "psnr_before": psnr(corrupted, clean), "psnr_after": psnr(restored, clean),
               "ssim_before": ssim_or_none(corrupted, clean), "ssim_after": ssim_or_none(restored, clean),
               "seconds": seconds, "threads": torch.get_num_threads(), "taught": list(projector.taught)}
        if method == "auto":
            row["auto"] = list(auto_method(op, projector.taught))
        if color:
            row["hue_accuracy"] = hue_accuracy(restored, labels[: args.n])
        if corruption == "down":
            bicubic = torch.nn.functional.interpolate(y, scale_factor=2, mode="bicubic", align_corners=False)
            row["psnr_bicubic"], row["ssim_bicubic"] = psnr(bicubic.clamp(-1, 1), clean), ssim_or_none(bicubic, clean)
        results.append(row)
        tag = "_".join([corruption, method] + [f"{k}{v}" for k, v in options.items()])
        grid = vstack([image_grid(t[:16], nrow=16) for t in (clean, corrupted, restored)])
        save_array_png(grid, os.path.join(args.out, f"{args.prefix}{tag}.png"))
        print(json.dumps(row, default=float), flush=True)
    os.makedirs(args.out, exist_ok=True)
    # rows measured before in the same file are kept unless measured again, so a table can be filled in parts
    path = os.path.join(args.out, f"{args.prefix}table{'_' + args.only if args.only else ''}.json")
    key = lambda row: (row["corruption"], row["method"], json.dumps(row["options"], sort_keys=True))  # noqa: E731
    kept = []
    if os.path.exists(path):
        with open(path) as f:
            kept = [row for row in json.load(f) if key(row) not in {key(r) for r in results}]
    with open(path, "w") as f:
        json.dump(kept + results, f, indent=1, default=float)


if __name__ == "__main__":
    main()
