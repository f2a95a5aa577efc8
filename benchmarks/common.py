"""Timing helpers shared by the benchmarks: median wall time (CUDA-synchronised), peak memory, device facts."""
import statistics
import time

import torch


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device, warmup=2, repeats=10, min_seconds=0.0):
    """Median seconds per call of fn() after warm-up."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    start_all = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start_all < min_seconds:
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
        if len(times) >= 10 * repeats:
            break
    return statistics.median(times)


def interleaved_median_times(fns, device, warmup=2, repeats=10):
    """{name: median seconds per call} for several callables timed round-robin: one call of each per round,
    so a change in machine load during the run (a shared CPU, GPU clocks) reaches all of them alike and
    their ratios stay fair. Each gets its warm-up first."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def trainer_step_rounds(trainers, rounds, steps):
    """{key: [seconds per train_step, one per round]} for several trainers timed in alternating rounds of `steps`
    steps each, so machine load hits them alike (CPU timing: no device sync)."""
    times = {key: [] for key in trainers}
    for _ in range(rounds):
        for key, trainer in trainers.items():
            start = time.perf_counter()
            for _ in range(steps):
                trainer.train_step()
            times[key].append((time.perf_counter() - start) / steps)
    return times


def print_step_rounds(times, describe):
    """One line per key of trainer_step_rounds' result: ms by round, the median, its ratio to the first key's."""
    first = statistics.median(next(iter(times.values())))
    for key, ts in times.items():
        print(f"{describe(key)}: ms per step by round " + ", ".join(f"{t * 1000:.1f}" for t in ts)
              + f"; median {statistics.median(ts) * 1000:.1f}, {statistics.median(ts) / first:.2f}x the first")


def peak_memory(fn, device):
    """Peak bytes allocated by fn() on CUDA; None on CPU (no allocator statistics there)."""
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def copy_bandwidth(device, nbytes=1 << 28):
    """Measured device copy bandwidth in bytes/s (read + write), the ceiling for memory-bound kernels."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), device, warmup=3, repeats=10)
    return 2 * nbytes / t


def matmul_rate(device, dtype=torch.bfloat16, n=8192):
    """Measured dense matmul rate in FLOP/s for dtype (the 'matrix peak' a step is compared with)."""
    if torch.device(device).type == "cpu":
        n = 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = median_time(lambda: a @ b, device, warmup=3, repeats=10)
    return 2 * n ** 3 / t


def device_name(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    import platform

    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def fmt_bytes(n):
    return "-" if n is None else f"{n / 2**20:.0f} MiB"
