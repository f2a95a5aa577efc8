"""Benchmark of the IGN loss: eager reference, torch.compile of the reference, the native op (C++/CUDA) and
the Triton op (GPU only), in forward, backward and forward+backward, float32 and bfloat16.

    python benchmarks/bench_ign_loss.py [--quick] [--device cpu|cuda] [--reps N]

Inputs are those of a fused training step: x (data, no gradient), fx, fz, and one tensor in both f_fz and
ff_z roles (ff_z = f_fz.detach() as a separate leaf). GB/s counts the bytes the op must move: each input
read once (forward), plus each gradient written once (backward and forward+backward, whose minimum is the
same). "copy%" is that rate against the device's measured copy bandwidth (read + write of a large tensor).
Every provider is checked against the eager reference before it is timed. Calls rotate through copies of
the inputs larger than the caches. Peak memory is CUDA's max_memory_allocated above what was allocated before
the timed calls (on CPU: not measured, "-").
"""
import argparse
import statistics
import sys
import time

import torch
import torch._functorch.config

import ign_fast
from ign_fast import ops, reference

SIZES = [(256, 1, 28, 28), (256, 3, 64, 64), (256, 3, 256, 256)]
QUICK_SIZES = SIZES[:2]
ROTATE_BYTES = {"cuda": 256 << 20, "cpu": 128 << 20}  # beyond H100/H200 L2 (50 MB), beyond a CPU's L3
CONFIG = dict(kind="l1", lambda_rec=20.0, lambda_idem=20.0, lambda_tight=2.5, tight_clamp_ratio=1.5)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device, reps, warmup=3):
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device, reps):
    """GB/s of a large copy (bytes read + bytes written)."""
    n = (1 << 28) // 4 if device.type == "cuda" else (1 << 26) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    seconds = median_time(lambda: dst.copy_(src), device, reps)
    return 2 * src.numel() * src.element_size() / seconds / 1e9


def make_inputs(shape, dtype, device):
    x = torch.randn(shape, device=device, dtype=dtype)
    fx = (x.float() + 0.3 * torch.randn(shape, device=device)).to(dtype).requires_grad_()
    fz = torch.randn(shape, device=device, dtype=dtype).requires_grad_()
    f_fz = (fz.detach().float() + 0.3 * torch.randn(shape, device=device)).to(dtype).requires_grad_()
    ff_z = f_fz.detach().requires_grad_()  # same storage: the fused step's case
    return x, fx, fz, f_fz, ff_z


def providers(device):
    def native(*t):
        ign_fast.set_backend("native")
        try:
            return ops.ign_loss(*t, **CONFIG)
        finally:
            ign_fast.set_backend("auto")

    def triton_op(*t):
        return ops.triton_ops().ign_loss(*t, CONFIG["kind"], CONFIG["lambda_rec"], CONFIG["lambda_idem"],
                                         CONFIG["lambda_tight"], CONFIG["tight_clamp_ratio"])[:4]

    found = {"eager": lambda *t: reference.ign_loss(*t, **CONFIG),
             "compile": torch.compile(lambda *t: reference.ign_loss(*t, **CONFIG))}
    if ops.kernel_path(torch.empty(0, device=device)) == "native":
        found["native"] = native
    if device.type == "cuda":
        try:
            import triton  # noqa: F401

            found["triton"] = triton_op
        except ImportError:
            pass
    return found


def check(fn, inputs, dtype):
    """fn's loss and gradients against the eager reference."""
    grads_of = [t for t in inputs if t.requires_grad]
    out = fn(*inputs)
    grads = torch.autograd.grad(out[0], grads_of)
    ref = reference.ign_loss(*inputs, **CONFIG)
    ref_grads = torch.autograd.grad(ref[0], grads_of)
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for a, b in zip(list(out) + list(grads), list(ref) + list(ref_grads)):
        torch.testing.assert_close(a.float(), b.float(), **tol)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer sizes (CPU)")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    # "bwd" times one graph's backward repeatedly (retain_graph), which donated buffers forbid
    torch._functorch.config.donated_buffer = False
    device = torch.device(args.device)
    reps = args.reps or (50 if device.type == "cuda" else 5)
    sizes = QUICK_SIZES if args.quick else SIZES
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    bandwidth = copy_bandwidth(device, reps)
    print(f"# device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, copy bandwidth {bandwidth:.1f} GB/s")
    print("| size | dtype | provider | mode | median ms | GB/s | copy% | vs eager | peak MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in sizes:
        for dtype in dtypes:
            first = make_inputs(shape, dtype, device)
            unit = first[0].numel() * first[0].element_size()
            # rotate through copies of the inputs, together larger than the caches, so no call finds its
            # inputs cached by the previous one
            copies = max(1, min(16, -(-ROTATE_BYTES[device.type] // (5 * unit))))
            sets = [first] + [make_inputs(shape, dtype, device) for _ in range(copies - 1)]
            n_grads = sum(t.requires_grad for t in first)
            n_read = 4  # x, fx, fz and the one f_fz/ff_z tensor
            moved = {"fwd": n_read * unit, "bwd": (n_read + n_grads) * unit, "fwd+bwd": (n_read + n_grads) * unit}
            eager_ms = {}
            for name, fn in providers(device).items():
                turn = [0]

                def next_index():
                    turn[0] = (turn[0] + 1) % copies
                    return turn[0]

                check(fn, first, dtype)
                graphs = [(fn(*inputs)[0], [t for t in inputs if t.requires_grad]) for inputs in sets]
                modes = {
                    "fwd": lambda: fn(*sets[next_index()]),
                    "bwd": lambda: torch.autograd.grad(*graphs[next_index()], retain_graph=True),
                    "fwd+bwd": lambda: torch.autograd.grad(
                        fn(*sets[next_index()])[0], [t for t in sets[turn[0]] if t.requires_grad]),
                }
                for mode, run in modes.items():
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                        base = torch.cuda.memory_allocated(device)
                    seconds = median_time(run, device, reps)
                    peak = (f"{(torch.cuda.max_memory_allocated(device) - base) / 2**20:.0f}"
                            if device.type == "cuda" else "-")
                    ms = seconds * 1e3
                    if name == "eager":
                        eager_ms[mode] = ms
                    gbps = moved[mode] / seconds / 1e9
                    print(f"| {'x'.join(map(str, shape))} | {str(dtype).replace('torch.', '')} | {name} | {mode} "
                          f"| {ms:.3f} | {gbps:.1f} | {100 * gbps / bandwidth:.0f}% | "
                          f"{eager_ms[mode] / ms:.2f}x | {peak} |", flush=True)
                graphs = None  # free the retained graphs before the next provider
    return 0


if __name__ == "__main__":
    sys.exit(main())
