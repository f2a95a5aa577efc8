"""Prototype sweep for the restoration defaults on a trained digit run (held-out MNIST-5k digits).

usage: python experiments/restore_sweep.py RUN [--n 256] [--what mask,down,noise,sketch] [--quick]
Prints PSNR for variants of each method (how the defaults were chosen); the final table is restore_table.py.
"""
import argparse
import time

import torch

from ign_fast.cli import corrupt, psnr
from ign_fast.data import load_mnist5k
from ign_fast.inference import load_trained
from ign_fast.operators import Downsample, Edges, Identity, Mask, random_square_mask
from ign_fast.restore import differentiable_f, restore


def main():
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--what", default="mask")
    p.add_argument("--variants", default="")
    p.add_argument("--fills", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(2)
    model, prior, _ = load_trained(args.run)
    f = differentiable_f(model)
    clean = load_mnist5k("test")[0][: args.n]

    def noise(n, g):
        return prior.sample(n, generator=g)

    def run(label, y, op, **kw):
        t = time.perf_counter()
        x = restore(f, y, op, noise=noise, **kw)
        print(f"  {label:50s} {psnr(x, clean):6.2f} dB  {time.perf_counter() - t:6.1f} s", flush=True)
        return x

    for what in args.what.split(","):
        g = torch.Generator().manual_seed(0)
        if what == "mask":
            op = Mask(random_square_mask(args.n, 28, generator=g))
            y = op.A(clean)
            print(f"mask: masked input {psnr(op.initial(y), clean):.2f} dB")
            for fill in ((-1.0, 0.0) if args.fills else (-1.0,)):
                op.fill = fill
                run(f"project fill={fill}", y, op, method="project")
            op.fill = -1.0
            for s in ((10, 40) if args.fills else ()):
                run(f"consistent {s}", y, op, method="consistent", steps=s)
            for spec in (args.variants or "150:4:0.05").split(","):
                s, k, lr, e = (spec.split(":") + ["mean"])[:4]
                run(f"latent steps={s} starts={k} lr={lr} combine={e}", y, op, method="latent", steps=int(s),
                    starts=int(k), lr=float(lr), combine=e)
        elif what == "down":
            op = Downsample(2)
            y = op.A(clean)
            bicubic = torch.nn.functional.interpolate(y, scale_factor=2, mode="bicubic", align_corners=False)
            print(f"down: bicubic {psnr(bicubic.clamp(-1, 1), clean):.2f} dB, consistent bicubic "
                  f"{psnr(op.initial(y), clean):.2f} dB")
            run("project", y, op, method="project")
            run("consistent 40", y, op, method="consistent", steps=40)
            for spec in (args.variants or "150:4:0.05").split(","):
                s, k, lr, e = (spec.split(":") + ["mean"])[:4]
                run(f"latent steps={s} starts={k} lr={lr} combine={e}", y, op, method="latent", steps=int(s),
                    starts=int(k), lr=float(lr), combine=e)
        elif what == "noise":
            y = corrupt(clean, "noise", g)
            print(f"noise: noisy input {psnr(y, clean):.2f} dB")
            for s in (1, 2, 3):
                run(f"project {s}", y, Identity(0.5), method="project", steps=s)
        elif what == "sketch":
            y = corrupt(clean, "sketch", g)
            print(f"sketch: edge map {psnr(y, clean):.2f} dB")
            for s in (1, 2):
                run(f"project {s}", y, Identity(1.0), method="project", steps=s)
            for spec in (args.variants or "150:4:0.05").split(","):
                s, k, lr, e = (spec.split(":") + ["mean"])[:4]
                for soft in (0.05, 0.1):
                    run(f"latent edges soft={soft} steps={s} starts={k} lr={lr} combine={e}", y,
                        Edges(softness=soft), method="latent", steps=int(s), starts=int(k), lr=float(lr),
                        combine=e)


if __name__ == "__main__":
    main()
