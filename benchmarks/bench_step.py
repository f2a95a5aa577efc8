"""Steps per second of one IGN update in each mode, with the step's FLOPs and peak memory.

Modes are timed round-robin (one step of each per round, medians over rounds), so load changes on a shared
machine reach every mode alike. Modes: reference eager fp32 (the four-call step), reference under
torch.compile with bf16 autocast (what the best public replication runs), fused fp32, fused + bf16, graph +
bf16 (GPU only). Correctness is asserted first: from the same weights, one fused step must land where the
reference step does.

  python benchmarks/bench_step.py --quick        # CPU: DCGAN 28 at batch 64 and 256
  python benchmarks/bench_step.py                # GPU: DCGAN 28 b256, DCGAN 64 b256 and b1024
"""
import argparse
import copy
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import device_name, fmt_bytes, interleaved_median_times, matmul_rate, peak_memory  # noqa: E402

import ign_fast  # noqa: E402
from ign_fast.models import DCGAN28, DCGAN64  # noqa: E402


def forward_flops_per_sample(model, shape):
    """Multiply-adds x2 of the convolutions and linear layers for one sample, counted with forward hooks."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total += 2 * module.in_channels * module.out_channels // module.groups * k * output[0].numel() // \
                module.out_channels
        elif isinstance(module, torch.nn.ConvTranspose2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total += 2 * module.in_channels * module.out_channels * k * inputs[0][0].numel() // module.in_channels
        elif isinstance(module, torch.nn.Linear):
            total += 2 * module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model(torch.zeros(1, *shape, device=next(model.parameters()).device))
    for h in handles:
        h.remove()
    return total


def step_flops(forward_flops, batch):
    # The work one IGN update must do: three forwards (x, z, f(z)); backward of f(x) and f(z) for weights
    # and inputs (2 forwards' worth each); the second application's weight and input gradients (2).
    return 9 * forward_flops * batch


def make_step(model, mode, amp, compile_reference=False):
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.5, 0.999))
    step = ign_fast.IGNStep(model, opt, mode=mode, amp_dtype=torch.bfloat16 if amp else None, check_inputs=False)
    if compile_reference:
        step._reference_forward = torch.compile(step._reference_forward)
    return step


def check_fused_matches_reference(make_model, shape, device):
    """Relative max-norm difference of the fused step's gradients from the reference's (same weights)."""
    torch.manual_seed(0)
    ref_model = make_model().to(device)
    fused_model = copy.deepcopy(ref_model)
    x = torch.rand(8, *shape, device=device) * 2 - 1
    z = torch.randn(8, *shape, device=device)
    grads = []
    for model, mode in ((ref_model, "reference"), (fused_model, "fused")):
        step = make_step(model, mode, False)
        step.forward_loss(x, z)[0].backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    error = ((grads[0] - grads[1]).abs().max() / grads[0].abs().max()).item()
    assert error < 1e-4, f"fused step's gradients differ from the reference's by {error:.2e} (relative)"
    return error


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="CPU-sized: DCGAN 28 only")
    parser.add_argument("--compile", action="store_true", help="include torch.compile of the reference on CPU")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device = args.device
    on_gpu = torch.device(device).type == "cuda"
    if on_gpu:
        torch.backends.cudnn.benchmark = True
    configs = [("dcgan28", lambda: DCGAN28(latent_dim=64, width=64, norm="group"), (1, 28, 28), 256)]
    if args.quick:
        configs = [("dcgan28 w32", lambda: DCGAN28(latent_dim=64, width=32, norm="group"), (1, 28, 28), 64),
                   ("dcgan28", lambda: DCGAN28(latent_dim=64, width=64, norm="group"), (1, 28, 28), 256)]
    else:
        configs += [("dcgan64", lambda: DCGAN64(width=64, norm="group"), (3, 64, 64), 256),
                    ("dcgan64", lambda: DCGAN64(width=64, norm="group"), (3, 64, 64), 1024)]
    modes = [("reference fp32", "reference", False, False), ("fused fp32", "fused", False, False)]
    if on_gpu or args.compile:
        modes.insert(1, ("reference compiled bf16", "reference", True, True))
    if on_gpu:
        modes += [("fused bf16", "fused", True, False), ("graph bf16", "graph", True, False)]
    peak = matmul_rate(device, torch.bfloat16 if on_gpu else torch.float32)
    print(f"device: {device_name(device)}; torch {torch.__version__}; measured matmul rate "
          f"{peak / 1e9:.0f} GFLOP/s ({'bf16' if on_gpu else 'fp32'})")
    print(f"{'model':<12} {'batch':>5} {'mode':<24} {'ms/step':>9} {'steps/s':>8} {'x ref':>6} "
          f"{'GFLOP/s':>8} {'% peak':>7} {'peak mem':>9}")
    for name, make_model, shape, batch in configs:
        error = check_fused_matches_reference(make_model, shape, device)
        flops = step_flops(forward_flops_per_sample(make_model().to(device), shape), batch)
        x = torch.rand(batch, *shape, device=device) * 2 - 1
        z = torch.randn(batch, *shape, device=device)

        def build(mode, amp, compiled):
            torch.manual_seed(0)
            return make_step(make_model().to(device), mode, amp, compiled)

        memory = {}
        if on_gpu:  # peak memory one mode at a time, every other mode's weights, state and graphs freed
            for label, mode, amp, compiled in modes:
                step = build(mode, amp, compiled)
                for _ in range(5):  # graph: past the eager warm-up, into replays
                    step(x, z)
                memory[label] = peak_memory(lambda: step(x, z), device)
                del step
                torch.cuda.empty_cache()
        calls = {label: (lambda s: lambda: s(x, z))(build(mode, amp, compiled))
                 for label, mode, amp, compiled in modes}
        seconds = interleaved_median_times(calls, device, warmup=5, repeats=args.repeats)
        baseline = seconds[modes[0][0]]
        for label, *_ in modes:
            rate = flops / seconds[label]
            print(f"{name:<12} {batch:>5} {label:<24} {seconds[label] * 1e3:>9.1f} {1 / seconds[label]:>8.2f} "
                  f"{baseline / seconds[label]:>6.2f} {rate / 1e9:>8.1f} {100 * rate / peak:>6.1f}% "
                  f"{fmt_bytes(memory.get(label)):>9}")
        print(f"{'':<12} {'':>5} step FLOPs {flops / 1e9:.1f} G; fused vs reference gradients: "
              f"{error:.1e} relative")


if __name__ == "__main__":
    main()
