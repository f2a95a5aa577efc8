"""Steps per second of one NAIGN update: ign_fast.NAIGNStep against a plain implementation of the same
objective (candidates through autograd-free model calls, torch.cdist + argmin, separate f(x) and f(z*)).
The k·B candidate forwards are most of the cost; ours runs them without autograd or buffer updates,
searches with the fused nearest_neighbors op, and batches f(x) with f(z*). Correctness is asserted first:
from the same weights and noise pool both compute the same loss. Providers are timed round-robin; on a GPU
also ours under bf16 autocast and captured as a CUDA graph (mode="graph"). "R=4" is ours with the pool and
its candidates made every 4th step (NAIGNLoss(refresh_every=4)), per step averaged over the 4.

  python benchmarks/bench_naign_step.py --quick     # CPU
"""
import argparse
import copy
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import device_name, fmt_bytes, interleaved_median_times, peak_memory  # noqa: E402

import ign_fast  # noqa: E402
from ign_fast.models import DCGAN28  # noqa: E402


class PlainNAIGNStep:
    """The NAIGN objective written the obvious way."""

    def __init__(self, model, optimizer, k):
        self.model, self.optimizer, self.k = model, optimizer, k

    def loss(self, x, pool):
        with torch.no_grad():
            candidates = self.model(pool)
        dist = torch.cdist(x.flatten(1), candidates.flatten(1), p=1)
        z_nn = pool[dist.argmin(dim=1)]
        fx, f_znn = self.model(x), self.model(z_nn)
        rec = (fx - x).abs().flatten(1).mean(1)
        imle = (f_znn - x).abs().flatten(1).mean(1)
        return rec.mean() + imle.mean()

    def __call__(self, x, pool):
        self.optimizer.zero_grad(set_to_none=True)
        total = self.loss(x, pool)
        total.backward()
        self.optimizer.step()
        return total.item()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device = args.device
    on_gpu = torch.device(device).type == "cuda"
    batches = [64] if args.quick else [64, 256]
    k, R = 8, 4
    print(f"device: {device_name(device)}; torch {torch.__version__}; DCGAN 28 width 32 latent 64 group norm, k={k}")
    print(f"{'batch':>5} {'provider':<20} {'ms/step':>9} {'steps/s':>8} {'x plain':>8} {'peak mem':>9}")
    for batch in batches:
        torch.manual_seed(0)
        base = DCGAN28(latent_dim=64, width=32, norm="group").to(device)
        x = torch.rand(batch, 1, 28, 28, device=device) * 2 - 1
        pool = torch.randn(k * batch, 1, 28, 28, device=device)
        plain_model = copy.deepcopy(base)
        plain = PlainNAIGNStep(plain_model, torch.optim.Adam(plain_model.parameters(), 5e-4), k)

        def ours(mode="fused", amp=None, refresh_every=1):
            model = copy.deepcopy(base)
            return ign_fast.NAIGNStep(model, torch.optim.Adam(model.parameters(), 5e-4), mode=mode, amp_dtype=amp,
                                      loss=ign_fast.NAIGNLoss(candidates_per_sample=k, refresh_every=refresh_every),
                                      sample_noise=lambda n: torch.randn(n, 1, 28, 28, device=device),
                                      check_inputs=False)

        def steps_of(step, n):  # n steps on the step's own pool: with R = n, one refresh and n - 1 reuses
            def run():
                for _ in range(n):
                    step(x)
            return run

        expected = plain.loss(x, pool).item()
        got = ours().forward_loss(x, pool)[0].item()
        assert abs(expected - got) <= 1e-4 * abs(expected), (expected, got)
        steps = {"plain": plain, "ign_fast": ours()}
        if on_gpu:
            steps["ign_fast bf16"] = ours(amp=torch.bfloat16)
            steps["ign_fast graph bf16"] = ours("graph", torch.bfloat16)
        calls = {label: (lambda s: lambda: s(x, pool))(step) for label, step in steps.items()}
        per_call = dict.fromkeys(calls, 1)
        # R = 4: candidates generated at every 4th step and searched at the other 3; timed 4 steps at a time
        calls[f"ign_fast R={R}"], per_call[f"ign_fast R={R}"] = steps_of(ours(refresh_every=R), R), R
        memory = {label: peak_memory(fn, device) for label, fn in calls.items()}  # graph: warm-up steps on CUDA
        seconds = interleaved_median_times(calls, device, warmup=5, repeats=args.repeats)
        seconds = {label: t / per_call[label] for label, t in seconds.items()}
        for label in calls:
            print(f"{batch:>5} {label:<20} {seconds[label] * 1e3:>9.1f} {1 / seconds[label]:>8.2f} "
                  f"{seconds['plain'] / seconds[label]:>8.2f} {fmt_bytes(memory[label]):>9}")


if __name__ == "__main__":
    main()
