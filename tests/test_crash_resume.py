"""SIGKILL a training run at random moments, saves included, then resume: the newest complete checkpoint
loads and the resumed run's losses equal an uninterrupted run's exactly.

Starting Python with torch costs seconds here, so runs are forked from one pre-warmed server process (torch
imported, one thread, so no OpenMP pool exists to break across fork). The server reaps a run only when the
test says so, so the pid the test kills is always its own run (a zombie at worst), never a reused one.
IGN_FAST_TEST_SAVE_DELAY makes every save sleep between writing its files and renaming its folder into place,
so many kills land inside a save. Every trial must really be cut short: a run that finished before its kill
fails the test (it would test nothing about crashes).
"""
import csv
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from ign_fast import checkpoint as ckpt
from ign_fast.cli import main

TRIALS = 6
STEPS = 20
# A kill aims at a random step before STEPS - MARGIN_STEPS and lands at most two step-times after it, so the
# run still has steps to go when the signal comes; the rest of the margin absorbs a loaded machine's delays.
MARGIN_STEPS = 6
SAVE_DELAY_S = 0.01
ARGS = ["train", "--objective", "ign", "--data", "moons", "--model", "mlp", "--batch-size", "8", "--steps",
        str(STEPS), "--keep", "3", "--log-every", "1", "--sample-every", "1000", "--no-progress"]
# the killed runs save every step; the reference and the resumed runs only at the end (how often a run
# saves does not change its losses), which keeps the test quick
KILLED = ARGS + ["--checkpoint-every", "1"]
QUICK = ARGS + ["--checkpoint-every", "1000"]

FORK_SERVER = r"""
import os, sys
import torch
torch.set_num_threads(1)
import ign_fast.cli
for line in sys.stdin:
    argv = line.split()
    pid = os.fork()
    if pid == 0:
        sys.stdin.close()
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # stdout carries the protocol
        code = 1
        try:
            code = ign_fast.cli.main(argv)
        finally:
            os._exit(code)
    print(pid, flush=True)
    sys.stdin.readline()  # reap only when told: until then the pid cannot be reused, so a kill is safe
    _, status = os.waitpid(pid, 0)
    print(status, flush=True)
"""


def read_losses(run):
    with open(os.path.join(run, "metrics.csv")) as f:
        return [(r["step"], r["loss"], r["rec"], r["idem"], r["tight"]) for r in csv.DictReader(f)]


def latest_step(root):
    try:
        with open(os.path.join(root, ckpt.LATEST)) as f:
            return int(f.read().strip()[len("step_"):])
    except (OSError, ValueError):  # not written yet
        return 0


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the forked runs use one thread: same kernels, same bits
    yield
    torch.set_num_threads(threads)


def test_sigkill_at_random_moments_then_resume_reproduces_the_run(tmp_path, one_thread):
    reference = str(tmp_path / "reference")
    start = time.perf_counter()
    assert main(KILLED + ["--out", reference]) == 0
    run_seconds = time.perf_counter() - start
    expected = read_losses(reference)
    assert main(QUICK + ["--out", str(tmp_path / "quick")]) == 0
    assert read_losses(str(tmp_path / "quick")) == expected
    assert len(expected) == STEPS

    env = dict(os.environ, OMP_NUM_THREADS="1", **{ckpt.TEST_SAVE_DELAY_ENV: str(SAVE_DELAY_S)})
    server = subprocess.Popen([sys.executable, "-c", FORK_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=env)
    rng = random.Random(1234)
    outcomes = []
    try:
        for trial in range(TRIALS):
            run = str(tmp_path / f"trial{trial}")
            server.stdin.write(" ".join(KILLED + ["--out", run]) + "\n")
            server.stdin.flush()
            pid = int(server.stdout.readline())
            root = os.path.join(run, "checkpoints")
            deadline = time.monotonic() + 120
            if trial == 0:  # inside the very first save: nothing complete exists yet
                while not (os.path.isdir(root) and any(n.startswith(".tmp-step") for n in os.listdir(root))):
                    assert time.monotonic() < deadline
                    time.sleep(0.0005)
            else:  # a random moment within a random step after the first checkpoint: training or saving
                target = rng.randrange(2, STEPS - MARGIN_STEPS)
                first = None  # (time, step) the first checkpoint was seen: the live step time, without the
                while (step := latest_step(root)) < target:  # start-up that run_seconds includes
                    if first is None and step >= 1:
                        first = (time.monotonic(), step)
                    assert time.monotonic() < deadline
                    time.sleep(0.002)
                now = time.monotonic()
                step_time = (now - first[0]) / (step - first[1]) if first and step > first[1] else run_seconds / STEPS
                time.sleep(rng.uniform(0, 2 * step_time))
            os.kill(pid, signal.SIGKILL)  # a run that already finished is a zombie: the signal is a no-op
            server.stdin.write("reap\n")
            server.stdin.flush()
            status = int(server.stdout.readline())
            killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            assert killed, (f"trial {trial}: the run ended by itself (wait status {status}) before the kill: it "
                            f"tested no crash")
            assert latest_step(root) < STEPS, f"trial {trial}: the run had saved its last step before the kill"
            in_save = any(n.startswith(".tmp-step") for n in os.listdir(root))
            try:
                newest = ckpt.load_checkpoint(run)["meta"]["step"]
            except ckpt.CheckpointError:
                newest = None
                assert not any(n.startswith("step_") for n in os.listdir(root))  # only when none completed
            assert main(QUICK + ["--out", run, "--resume"]) == 0
            assert read_losses(run) == expected, f"trial {trial}: newest checkpoint {newest}"
            outcomes.append((killed, in_save, newest))
    finally:
        server.stdin.close()
        server.wait(timeout=60)
    print(f"crash trials: {len(outcomes)} run, {sum(k for k, _, _ in outcomes)} killed, "
          f"{sum(s for _, s, _ in outcomes)} inside a save, resumed from steps {[n for _, _, n in outcomes]}")
    assert len(outcomes) == TRIALS and all(k for k, _, _ in outcomes)  # every trial was cut short
    assert sum(s for _, s, _ in outcomes) >= 1  # and saves were interrupted (trial 0 waits for one)


def test_crash_inside_the_first_save_resumes_as_a_fresh_run(tmp_path, one_thread):
    """The staged state of a run killed inside its first save: a temporary folder with part of a checkpoint,
    no complete checkpoint, no pointer. Deterministic, whatever the timing of the random trials."""
    reference, run = str(tmp_path / "reference"), str(tmp_path / "run")
    assert main(QUICK + ["--out", reference]) == 0
    partial = os.path.join(run, "checkpoints", ".tmp-step_00000001-abc123")
    os.makedirs(partial)
    with open(os.path.join(partial, "model.safetensors"), "wb") as f:
        f.write(b"\x00" * 10)
    with open(os.path.join(run, "metrics.csv"), "w") as f:
        f.write("step,loss,rec,idem,tight\n1")  # a row torn mid-write
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load_checkpoint(run)
    assert main(QUICK + ["--out", run, "--resume"]) == 0
    assert read_losses(run) == read_losses(reference)
    assert not os.path.exists(partial)  # the next save swept the leftover away


@pytest.mark.parametrize("torn", ["1", "12,10.5", "12,10.5,0.5,0.01,-0.0"])
def test_a_torn_metrics_row_is_not_kept_on_resume(tmp_path, torn):
    from ign_fast.trainer import MetricsLog

    path = str(tmp_path / "metrics.csv")
    rows = "".join(f"{s},1.0,0.5,0.1,-0.1\n" for s in range(1, 12))
    with open(path, "w") as f:
        f.write("step,loss,rec,idem,tight\n" + rows + torn)  # killed while appending step 12
    log = MetricsLog(path, resume_step=11)
    assert [int(r["step"]) for r in log.rows] == list(range(1, 12))
    log.append({"step": 12, "loss": "2", "rec": "1", "idem": "0", "tight": "0"})
    with open(path) as f:
        assert f.read().splitlines()[-2:] == ["11,1.0,0.5,0.1,-0.1", "12,2,1,0,0"]
