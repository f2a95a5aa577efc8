"""Images streamed from disk (ign_fast.streaming) against the same images held in memory.

1. Memory: peak RSS of a process that lists N generated PNG files, checks their headers and serves 50 batches
   through worker processes, for each N (default 20,000 and 100,000): it must not grow with N beyond the
   file list (one bytes buffer, about 60 bytes a file).
2. Speed: NAIGN steps/s of the demo model (DCGAN 28, batch 64) on a streamed folder against the same images in
   memory, round-robin in one process after checking that both loaders serve equal batches.

    python benchmarks/bench_streaming.py                 # both parts, files under a temporary folder
    python benchmarks/bench_streaming.py --counts 2000 --steps 20   # a quick run
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

from common import trainer_step_rounds  # benchmarks/, next to this file

SIZE = 28


MEMORY_CHILD = """
import gc, resource, sys, time
from ign_fast.streaming import ImageFolderDataset, StreamingLoader
folder, workers = sys.argv[1], int(sys.argv[2])
start = time.perf_counter()
dataset = ImageFolderDataset(folder, size=28)
listed = time.perf_counter() - start
loader = StreamingLoader(dataset, 64, seed=0, num_workers=workers)
for _ in range(50):
    loader.next_batch()
loader.load_state_dict(loader.state_dict())  # drops the DataLoader: its workers exit and are waited for,
gc.collect()                                 # so RUSAGE_CHILDREN counts them
self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(len(dataset), self_kb, child_kb, round(listed, 1))
"""


def memory(folder, workers):
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, folder, str(workers)], capture_output=True, text=True,
                         check=True)
    n, self_kb, child_kb, listed = out.stdout.split()
    return int(n), int(self_kb) / 1024, int(child_kb) / 1024, float(listed)


def speed(folder, steps, rounds):
    import torch

    from ign_fast.data import InMemoryLoader, load_image_folder
    from ign_fast.trainer import TrainConfig, Trainer
    from ign_fast.streaming import ImageFolderDataset, StreamingLoader, to_model_range

    torch.set_num_threads(1)
    in_memory = load_image_folder(folder, size=SIZE)
    dataset = ImageFolderDataset(folder, size=SIZE)
    a, b = InMemoryLoader(in_memory, 64, seed=0), StreamingLoader(dataset, 64, seed=0, num_workers=2)
    for _ in range(3):  # the same batches, or the timing compares different work
        assert torch.equal(a.next_batch(), to_model_range(b.next_batch()))
    trainers = {}
    for name, data in (("in memory", in_memory), ("streamed", dataset)):
        out = tempfile.mkdtemp()
        config = TrainConfig(steps=10 ** 9, out=out, progress=False, sample_every=10 ** 9,
                             checkpoint_every=10 ** 9, num_workers=2, device="cpu")
        trainers[name] = Trainer(config, data=data, overwrite=True)
        for _ in range(3):
            trainers[name].train_step()  # warm-up: workers started, first pool made
    times = trainer_step_rounds(trainers, rounds, steps)
    return {name: float(np.median(t)) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--counts", type=int, nargs="+", default=[20_000, 100_000])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--folder", default=None, help="where to write the PNGs (default: a temporary folder)")
    args = parser.parse_args()
    root = args.folder or tempfile.mkdtemp(prefix="ign_fast_stream_")
    try:
        print("| files | peak RSS main | peak RSS of a worker | listing + header check |")
        print("|---|---|---|---|")
        written = 0
        for count in sorted(args.counts):
            write_pngs_range(root, written, count)
            written = count
            n, main_mb, child_mb, listed = memory(root, args.workers)
            assert n == count, (n, count)
            print(f"| {count:,} | {main_mb:.0f} MB | {child_mb:.0f} MB | {listed:.1f} s |", flush=True)
        result = speed(root, args.steps, args.rounds)
        ratio = result["in memory"] / result["streamed"]
        print(f"\nNAIGN step, DCGAN 28, batch 64, {written:,} files, one thread, {args.rounds} rounds of "
              f"{args.steps} steps: in memory {1 / result['in memory']:.1f} steps/s, streamed "
              f"{1 / result['streamed']:.1f} steps/s ({ratio:.2f}x of in-memory speed)")
    finally:
        if args.folder is None:
            shutil.rmtree(root, ignore_errors=True)


def write_pngs_range(folder, start, stop, seed=0):
    """PNGs start..stop-1, RGB SIZE x SIZE, in subfolders of 1,000 (as datasets ship them)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(64, SIZE, SIZE, 3), dtype=np.uint8)
    for i in range(start, stop):
        sub = os.path.join(folder, f"{i // 1000:04d}")
        os.makedirs(sub, exist_ok=True)
        Image.fromarray(np.roll(base[i % 64], i % SIZE, axis=1)).save(os.path.join(sub, f"{i:07d}.png"))


if __name__ == "__main__":
    main()
