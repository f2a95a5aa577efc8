"""Images per second of f^N for the eager model, its TorchScript export and its torch.export program.

    python benchmarks/bench_export.py                 # CPU table (and GPU table when CUDA is present)
    python benchmarks/bench_export.py --quick         # fewer repeats
    python benchmarks/bench_export.py --bn-policy RUN # batch statistics vs running statistics on a BN run

Model: DCGAN28, width 32, latent 64, group norm (the demo model). Batches 1 and 256, N = 1 and 3. Every
provider's output is checked against eager (max |diff| <= 1e-5) before it is timed. CPU times are the median
of repeated calls after warm-up; GPU times use CUDA events, and at batch 1 also a CUDA graph of the eager f^N
(launch overhead dominates there).
"""
import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ign_fast.export import export_projector, load_torchscript  # noqa: E402
from ign_fast.inference import apply_f  # noqa: E402
from ign_fast.models import build_model  # noqa: E402

BATCHES = (1, 256)
STEPS = (1, 3)
ATOL = 1e-5


def demo_model():
    torch.manual_seed(0)
    return build_model("dcgan28", in_channels=1, latent_dim=64, width=32, norm="group").eval()


def providers(model, folder, steps, device):
    """name -> callable(x) computing f^steps(x) on device."""
    ts_path = os.path.join(folder, f"f{steps}.pt")
    export_projector(model, ts_path, steps=steps)
    scripted, _ = load_torchscript(ts_path, map_location=device)
    pt2_path = os.path.join(folder, f"f{steps}.pt2")
    export_projector(model, pt2_path, steps=steps, format="export")
    program = torch.export.load(pt2_path).module().to(device)
    eager = model.to(device)
    return {
        "eager": lambda x: apply_f(eager, x, steps),
        "torchscript": lambda x: scripted(x),
        "torch.export": lambda x: program(x),
    }


def time_cpu(fn, x, repeats):
    """(median, fastest) seconds per call. On a shared machine the fastest call is the least disturbed one, so
    both are reported."""
    with torch.no_grad():
        for _ in range(3):
            fn(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def time_cuda(fn, x, repeats):
    with torch.no_grad():
        for _ in range(5):
            fn(x)
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(x)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times), min(times)


def cuda_graph(fn, example):
    """f^N captured once as a CUDA graph on a static input buffer: replays skip per-kernel launch overhead."""
    static_input = example.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):
            fn(static_input)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_output = fn(static_input)

    def replay(x):
        static_input.copy_(x)
        graph.replay()
        return static_output

    return replay


def run_table(device, repeats):
    model = demo_model()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for steps in STEPS:
            fns = providers(model, folder, steps, device)
            for batch in BATCHES:
                x = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(batch)).to(device)
                table = dict(fns)
                if device.type == "cuda" and batch == 1:
                    table["eager + CUDA graph"] = cuda_graph(fns["eager"], x)
                reference = fns["eager"](x)
                for name, fn in table.items():
                    with torch.no_grad():
                        gap = (fn(x) - reference).abs().max().item()
                    if gap > ATOL:
                        raise AssertionError(f"{name} differs from eager by {gap} (N={steps}, batch={batch})")
                    timer = time_cuda if device.type == "cuda" else time_cpu
                    seconds, fastest = timer(fn, x, repeats if batch == 1 else max(5, repeats // 4))
                    rows.append((name, steps, batch, seconds, fastest))
                    print(f"{device.type:5s} {name:20s} N={steps} batch={batch:4d}  {seconds * 1e3:9.3f} ms  "
                          f"{batch / seconds:10.0f} images/s (fastest call {batch / fastest:.0f})", flush=True)
    return rows


def markdown(rows):
    lines = ["| provider | N | batch | median ms | images/s (median) | images/s (fastest call) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, steps, batch, seconds, fastest in rows:
        lines.append(f"| {name} | {steps} | {batch} | {seconds * 1e3:.3f} | {batch / seconds:,.0f} | "
                     f"{batch / fastest:,.0f} |")
    return "\n".join(lines)


@torch.no_grad()
def bn_policy(run, n=500, seed=0):
    """Samples of a BatchNorm run under batch statistics (ign_fast's policy) and under running statistics
    (eval mode): drift ||f(f(z)) - f(z)|| (per-sample RMS), pixel mean/std against the data's, and the mean
    per-sample RMS distance to the nearest training digit."""
    from ign_fast.data import load_mnist5k
    from ign_fast.inference import load_trained

    model, prior, meta = load_trained(run)
    data, _ = load_mnist5k("train")
    z = prior.sample(n, generator=torch.Generator().manual_seed(seed))
    flat_data = data.flatten(1)
    print(f"run {run}: step {meta['step']}, {meta['model_config']}, {n} samples, seed {seed}")
    print(f"data: pixel mean {data.mean():.4f}, std {data.std():.4f}")
    print("| normalisation | drift RMS f(f(z)) vs f(z) | pixel mean | pixel std | RMS to nearest training digit |")
    print("| --- | ---: | ---: | ---: | ---: |")
    # Under batch statistics a sample depends on its batch: also measured in small batches, as a user projecting
    # a few images at a time would run it.
    for label, chunk in ((f"batch statistics, one batch of {n}", n), ("batch statistics, batches of 8", 8),
                         ("batch statistics, batches of 1", 1), ("running statistics (eval)", None)):
        if chunk is not None:
            fz = torch.cat([apply_f(model, part, 1) for part in z.split(chunk)])
            ffz = torch.cat([apply_f(model, part, 1) for part in fz.split(chunk)])
        else:
            model.eval()
            fz = model(z)
            ffz = model(fz)
        drift = (ffz - fz).square().flatten(1).mean(1).sqrt().mean()
        nearest = torch.cdist(fz.flatten(1), flat_data).min(1).values / (flat_data.shape[1] ** 0.5)
        print(f"| {label} | {drift:.4f} | {fz.mean():.4f} | {fz.std():.4f} | {nearest.mean():.4f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--bn-policy", metavar="RUN", default=None, help="compare BN policies on this run")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.bn_policy:
        bn_policy(args.bn_policy)
        return
    repeats = 10 if args.quick else 40
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} torch threads, load average {load:.1f} at start")
    rows = run_table(torch.device("cpu"), repeats)
    print("\nCPU\n" + markdown(rows))
    if torch.cuda.is_available():
        gpu_rows = run_table(torch.device("cuda"), repeats * 5)
        print(f"\nGPU ({torch.cuda.get_device_name()})\n" + markdown(gpu_rows))


if __name__ == "__main__":
    main()
