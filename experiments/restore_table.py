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
from ign_fast.data import load_mnist5k, load_mnist5k_color
from ign_fast.images import image_grid, save_array_png, vstack
from ign_fast.inference import Projector

ROWS = [  # (corruption, method, options)
    ("mask", "project", {}), ("mask", "consistent", {}), ("mask", "latent", {}),
    ("mask", "latent", {"steps": 150, "starts": 4}),
    ("mask", "latent", {"steps": 150, "starts": 4, "combine": "mean"}),
    ("down", "project", {}), ("down", "consistent", {}), ("down", "latent", {}),
    ("down", "latent", {"steps": 150, "starts": 4}),
    ("noise", "project", {}), ("noise", "project", {"steps": 2}),
    ("sketch", "project", {}), ("sketch", "latent", {}), ("sketch", "latent", {"steps": 150, "starts": 4}),
]
COLOR_ROWS = [("gray", "project", {}), ("gray", "consistent", {}), ("gray", "latent", {})]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--out", default="docs/figures/restore")
    p.add_argument("--only", default="", help="comma-separated corruptions")
    p.add_argument("--options-only", action="store_true", help="only the rows with non-default options")
    p.add_argument("--prefix", default="", help="prefix of the grid and table file names (one run's from another's)")
    args = p.parse_args()
    projector = Projector.load(args.run)
    color = projector.input_shape[0] == 3
    clean = (load_mnist5k_color if color else load_mnist5k)("test")[0][: args.n]
    results = []
    for corruption, method, options in COLOR_ROWS if color else ROWS:
        if args.only and corruption not in args.only.split(","):
            continue
        if args.options_only and not options:
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
               "seconds": seconds, "threads": torch.get_num_threads()}
        if corruption == "down":
            bicubic = torch.nn.functional.interpolate(y, scale_factor=2, mode="bicubic", align_corners=False)
            row["psnr_bicubic"], row["ssim_bicubic"] = psnr(bicubic.clamp(-1, 1), clean), ssim_or_none(bicubic, clean)
        results.append(row)
        tag = "_".join([corruption, method] + [f"{k}{v}" for k, v in options.items()])
        grid = vstack([image_grid(t[:16], nrow=16) for t in (clean, corrupted, restored)])
        save_array_png(grid, os.path.join(args.out, f"{args.prefix}{tag}.png"))
        print(json.dumps(row, default=float), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.prefix}table{'_' + args.only if args.only else ''}.json"), "w") as f:
        json.dump(results, f, indent=1, default=float)


if __name__ == "__main__":
    main()
