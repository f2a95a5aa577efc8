"""Benchmark of ign_fast.nearest_neighbors (the IMLE search) against torch.cdist + argmin.

    python benchmarks/bench_nearest_neighbors.py --quick            # CPU: B=256, M up to 10,240, D=784
    python benchmarks/bench_nearest_neighbors.py --device cuda      # B=256, M 2,560 .. 65,536, D 784 and 12,288

Each size is checked first: ours against a float64 direct-difference search on a sample of queries, and
against the baseline's index (near ties aside). Then the median time of each provider, its throughput
(2 B M D operations: one difference and one accumulation per element pair) and its peak memory beyond the
inputs: on CUDA torch.cuda.max_memory_allocated; on CPU (Linux) the peak resident set (VmHWM) of a fresh
process that makes the inputs, resets its high-water mark (/proc/self/clear_refs) and calls the provider
once, minus its resident set just before: every allocation counts, torch's or not. Prints a markdown table.
"""
import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

import ign_fast

NEAR_TIE = 1e-5


def make_inputs(batch, count, width, device, seed=0):
    generator = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(batch, width, generator=generator).to(device)
    c = torch.randn(count, width, generator=generator).to(device)
    return q, c


def baseline(q, c, metric):
    dist = torch.cdist(q, c, p=1.0 if metric == "l1" else 2.0)  # the B x M matrix
    return dist.argmin(dim=1)


def ours(q, c, metric):
    return ign_fast.nearest_neighbors(q, c, metric)[0]


def ours_triton(q, c, metric):
    from ign_fast.kernels.nearest_neighbors import nearest_neighbors_triton

    return nearest_neighbors_triton(q, c, metric)[0]


PROVIDERS = {"torch cdist+argmin": baseline, "ign_fast": ours, "ign_fast triton": ours_triton}


def check(q, c, metric, sample=16):
    """Ours against a float64 direct-difference search on `sample` queries, and against the baseline."""
    index, distance = ign_fast.nearest_neighbors(q, c, metric)
    q64 = q[:sample].double()
    best = torch.full((q64.shape[0],), float("inf"), dtype=torch.float64, device=q.device)
    second = best.clone()
    best_idx = torch.zeros(q64.shape[0], dtype=torch.int64, device=q.device)
    chosen = torch.zeros_like(best)
    for start in range(0, c.shape[0], 1024):
        chunk = c[start:start + 1024].double()
        if metric == "l1":
            dist = torch.cdist(q64, chunk, p=1) / q.shape[1]
        else:
            dist = torch.cdist(q64, chunk, compute_mode="donot_use_mm_for_euclid_dist") ** 2 / q.shape[1]
        in_chunk = (index[:sample] >= start) & (index[:sample] < start + chunk.shape[0])
        local = (index[:sample] - start).clamp(0, chunk.shape[0] - 1)
        chosen = torch.where(in_chunk, dist.gather(1, local[:, None])[:, 0], chosen)
        top = dist.topk(min(2, dist.shape[1]), dim=1, largest=False)
        for k in range(top.values.shape[1]):
            value, idx = top.values[:, k], top.indices[:, k] + start
            better = value < best
            second = torch.where(better, best, torch.minimum(second, value))
            best_idx = torch.where(better, idx, best_idx)
            best = torch.where(better, value, best)
    tol = NEAR_TIE * best
    assert bool((chosen <= best + tol).all()), "ign_fast returned a candidate that is not nearest"
    clear = (second - best) > tol
    assert torch.equal(index[:sample][clear], best_idx[clear]), "ign_fast index differs from float64 search"
    torch.testing.assert_close(distance[:sample].double(), chosen, atol=1e-6, rtol=1e-5)
    agree = (baseline(q, c, metric) == index).float().mean().item()
    assert agree > 0.99, f"only {agree:.3f} of indices agree with torch.cdist + argmin"
    return agree


def median_times(fns, device, reps):
    """Median seconds of each function. The providers take turns within every repetition, so a change in
    the load of a shared machine hits them alike."""
    for fn in fns:
        fn()  # warm-up (and, for Triton, compile)
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, samples in zip(fns, times):
            if device.type == "cuda":
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                samples.append(start.elapsed_time(end) / 1e3)
            else:
                start = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - start)
    return [statistics.median(samples) for samples in times]


def peak_memory_cuda(fn):
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def peak_memory_cpu(provider, metric, batch, count, width, threads):
    """Peak resident-set growth of one call, measured in a fresh process."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--memprobe", provider, metric, str(batch),
                          str(count), str(width), "--threads", str(threads)],
                         capture_output=True, text=True, timeout=600, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def memprobe(args):
    torch.set_num_threads(args.threads)
    provider, metric, batch, count, width = args.memprobe
    q, c = make_inputs(int(batch), int(count), int(width), torch.device("cpu"))
    small_q, small_c = q[:2].clone(), c[:3].clone()
    PROVIDERS[provider](small_q, small_c, metric)  # load lazily initialised libraries before the baseline reading
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset the peak resident set to the current one (Linux >= 4.0)
    before = _proc_status_bytes("VmRSS")
    PROVIDERS[provider](q, c, metric)
    print(_proc_status_bytes("VmHWM") - before)


def _proc_status_bytes(key):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # reported in kB


def human_bytes(n):
    if n != n:
        return "not measured"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="M up to 10,240 and D = 784 only (CPU)")
    parser.add_argument("--metrics", nargs="+", default=["l1", "l2"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    parser.add_argument("--memprobe", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memprobe:
        return memprobe(args)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    counts = [2560, 10240] if args.quick else [2560, 10240, 40960, 65536]
    widths = [784] if args.quick else [784, 12288]
    reps = args.reps or (5 if device.type == "cpu" else 20)
    providers = ["torch cdist+argmin", "ign_fast"]
    if device.type == "cuda":
        try:
            import triton  # noqa: F401

            providers.append("ign_fast triton")
        except ImportError:
            pass

    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        machine = platform.processor() or platform.machine()
    print(f"# nearest_neighbors benchmark: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"torch {torch.__version__}, device {machine}, {args.threads} threads, command: python {' '.join(sys.argv)}")
    print()
    print("| metric | B | M | D | provider | median ms | GOP/s | peak extra memory | speed-up | index agreement |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for metric in args.metrics:
        for width in widths:
            for count in counts:
                q, c = make_inputs(args.batch, count, width, device)
                agree = check(q, c, metric)
                calls = [lambda fn=PROVIDERS[name]: fn(q, c, metric) for name in providers]
                seconds_all = median_times(calls, device, reps)
                base_time = seconds_all[0]
                for name, call, seconds in zip(providers, calls, seconds_all):
                    if device.type == "cuda":
                        memory = peak_memory_cuda(call)
                    elif args.no_memory:
                        memory = float("nan")
                    else:
                        memory = peak_memory_cpu(name, metric, args.batch, count, width, args.threads)
                    ops = 2.0 * args.batch * count * width
                    print(f"| {metric} | {args.batch} | {count} | {width} | {name} | {seconds * 1e3:.2f} | "
                          f"{ops / seconds / 1e9:.1f} | {human_bytes(memory)} | {base_time / seconds:.2f}x | "
                          f"{agree:.4f} |", flush=True)
                q = c = None  # free the inputs before the next size
                if device.type == "cuda":
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
