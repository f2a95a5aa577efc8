"""How far can a network trained *only* to inpaint go on MNIST-5k's masked-digit benchmark (issue 13)?

Trains a plain regressor g(masked digit) -> digit with the squared error on the missing pixels (what the
posterior mean minimises, and what PSNR scores), on the 4,000 training digits, with the restoration term's
masks (random 10-14 px squares, mid-gray fill: ign_fast.corruptions.square_masks). No IGN objective, no
generation: it is the ceiling a restoration term inside IGN could at best approach with the same network and
data. Then scores it like `ign-fast restore RUN --corruption mask` (256 held-out digits, seed-0 squares, known
pixels put back) in three ways, because they disagree on this benchmark:

- `mean`: the mean over images of each image's PSNR, what `ign-fast restore` prints;
- `changed`: the same over the images the square changes (a square on empty background leaves its digit
  exact, PSNR floored at 126 dB before, which no restoration short of bit-exact keeps);
- `pooled`: the PSNR of the mean squared error over all pixels of all images (torchmetrics' default).

Optionally scores trained ign_fast runs the same way (`--runs`, `Projector.restore`, method auto), so the
numbers sit side by side.

    python experiments/inpaint_ceiling.py --model dcgan28 --steps 2000
    python experiments/inpaint_ceiling.py --model knn --runs runs/demo
"""
import argparse
import json
import time

import torch

from ign_fast import Projector
from ign_fast.cli import restoration_scores
from ign_fast.corruptions import square_masks
from ign_fast.data import load_mnist5k
from ign_fast.models import build_model
from ign_fast.operators import MISSING_FILL, Mask, random_square_mask


def benchmark(n=256, seed=0):
    """The held-out masked digits of `ign-fast restore --corruption mask` (same digits, same squares)."""
    clean = load_mnist5k("test")[0][:n]
    op = Mask(random_square_mask(n, clean.shape[-1], channels=clean.shape[1],
                                 generator=torch.Generator().manual_seed(seed)))
    y = op.A(clean)
    return clean, op, y


def train_regressor(name, steps, batch, lr, seed, width=32, loss_kind="mse"):
    torch.manual_seed(seed)
    data = load_mnist5k("train")[0]
    # the demo's network (GroupNorm DCGAN 28, width 32, latent 64), or a U-Net of the same first width
    kwargs = ({"in_channels": 1, "image_size": 28, "width": width, "depth": 3} if name == "unet"
              else {"in_channels": 1, "width": width, "latent_dim": 64, "norm": "group"})
    model = build_model(name, **kwargs)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    start = time.perf_counter()
    for step in range(steps):
        x = data[torch.randint(len(data), (batch,))]
        keep = square_masks(batch, 28, 28, (10, 14), x.device)
        inp = torch.where(keep, x, torch.full_like(x, MISSING_FILL))
        err = ((model(inp) - x).square() * (~keep)).flatten(1).sum(1) / (~keep).flatten(1).sum(1)
        # "mse": the posterior mean, what pooled PSNR scores; "logmse": the mean of each image's log error,
        # what the mean of per-image PSNRs scores (10 log10(4 / mse) is affine in log mse)
        loss = err.mean() if loss_kind == "mse" else (err + 1e-4).log().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 500 == 0 or step == steps - 1:
            print(f"{name} step {step} hole mse {err.mean().item():.4f} ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    return model.eval(), time.perf_counter() - start


def knn_fill(y, known, k=16, temperature=0.05):
    """A nearest-neighbour fill: the k training digits nearest on the known pixels (mean squared distance
    over them), softmax-weighted at `temperature`, their mean in the hole. No network: a baseline."""
    train = load_mnist5k("train")[0].flatten(1)
    m, v = known.flatten(1), y.flatten(1)
    # sum_p m (t - v)^2 = m.t^2 - 2 (m v).t + m.v^2, over the known pixels of each image
    d = (m @ train.square().T - 2 * (m * v) @ train.T + (m * v.square()).sum(1, keepdim=True)) / m.sum(1, keepdim=True)
    dist, index = d.topk(k, dim=1, largest=False)
    w = torch.softmax(-dist / temperature, dim=1)
    return (w.unsqueeze(-1) * train[index]).sum(1).view_as(y)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("dcgan28", "unet", "knn", "none"), default="dcgan28",
                   help="the regressor's network, knn (nearest training digits, no training) or none")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--width", type=int, default=32, help="the network's first width (the demo's: 32)")
    p.add_argument("--loss", choices=("mse", "logmse"), default="mse", help="the regressor's loss on the hole")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", nargs="*", default=[], help="ign_fast runs to score the same way (method auto)")
    p.add_argument("--json", help="write the scores here")
    args = p.parse_args()
    clean, op, y = benchmark()
    corrupted = op.corrupted_image(y)
    results = {}
    if args.model == "knn":
        with torch.no_grad():
            restored = op.consistent(knn_fill(y, op.known.expand_as(y)), y)
        results["nearest training digits (k 16)"] = restoration_scores(restored, corrupted, clean)
    elif args.model != "none":
        model, seconds = train_regressor(args.model, args.steps, args.batch, args.lr, args.seed,
                                         args.width, args.loss)
        with torch.no_grad():
            restored = op.consistent(model(op.initial(y)), y)
        name = f"regressor {args.model} w{args.width} {args.loss} {args.steps} steps"
        results[name] = dict(restoration_scores(restored, corrupted, clean), train_seconds=round(seconds))
    for run in args.runs:
        with torch.no_grad():
            restored = Projector.load(run).restore(y, op, method="auto", seed=0).cpu()
        results[run] = restoration_scores(restored, corrupted, clean)
    for name, s in results.items():
        print(f"{name}: mean {s['before']:.2f} -> {s['after']:.2f} dB (+{s['after'] - s['before']:.2f}); "
              f"on the {s['changed']} changed {s['changed_before']:.2f} -> {s['changed_after']:.2f} "
              f"(+{s['changed_after'] - s['changed_before']:.2f}); pooled {s['pooled_before']:.2f} -> "
              f"{s['pooled_after']:.2f} (+{s['pooled_after'] - s['pooled_before']:.2f})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
