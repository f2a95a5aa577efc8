"""Data parallel training on CPU over gloo with 2 ranks.

One spawn of two workers does all the multi-rank work (each Python start costs seconds here): the step
equivalence checks, then trainer runs. The parent checks the results, resumes a 2-rank checkpoint on 1
rank, and one test starts the real command line under torchrun."""
import csv
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ign_fast import checkpoint as ckpt
from ign_fast.data import InMemoryLoader
from ign_fast.distributed import GradientAverager
from ign_fast.models import DCGAN28
from ign_fast.trainer import TrainConfig, Trainer

WORLD = 2
STEPS = 3
LOCAL_BATCH = 3
# (norm, mode): the two step modes whose gradients reach θ by different routes (functional_call vs a
# custom autograd Function), on a model with GroupNorm and one without normalisation
STEP_CASES = [("group", "reference"), ("group", "fused"), ("none", "reference"), ("none", "fused")]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model(norm):
    torch.manual_seed(0)
    return DCGAN28(latent_dim=8, width=8, norm=norm)


def _global_batches(steps, batch):
    g = torch.Generator().manual_seed(1)
    return [(torch.rand(batch, 1, 28, 28, generator=g) * 2 - 1, torch.randn(batch, 1, 28, 28, generator=g))
            for _ in range(steps)]


def _train_steps(norm, mode, batches, rank=0, world=1, grad_sync=False):
    """STEPS IGN steps; under data parallel each rank takes its contiguous slice of every global batch."""
    from ign_fast import IGNStep

    model = _model(norm)
    # SGD with momentum: its update is linear in the gradient, so float32 reduction-order differences stay
    # at rounding level (Adam divides tiny gradients by their own size and can amplify them)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step = IGNStep(model, opt, mode=mode)
    averager = None
    if grad_sync:
        averager = step.grad_sync = GradientAverager(model.parameters(), world)
    losses = []
    for x, z in batches:
        n = x.shape[0] // world
        losses.append(step(x[rank * n:(rank + 1) * n], z[rank * n:(rank + 1) * n])["loss"])
    return model.state_dict(), losses, averager.calls if averager else None


# a pool of k·B = 16 refreshed every other step: the search over candidates gathered from both ranks, and
# the reuse of those candidates between refreshes, both run
NAIGN_SMALL = {"candidates": 2, "refresh_every": 2}


def _streamed(folder):
    """NAIGN on images streamed from disk by a worker process (a GroupNorm DCGAN: per-sample outputs)."""
    return {"objective": "naign", **NAIGN_SMALL, "data": "images", "data_root": os.path.join(folder, "images"),
            "image_size": 28, "model": "dcgan28", "width": 8, "latent_dim": 8, "num_workers": 1}


def _run_config(out, steps, resume=False, **kw):
    values = dict(objective="ign", data="moons", model="mlp", batch_size=8, steps=steps, checkpoint_every=2,
                  log_every=1, sample_every=1000, progress=False, out=out)
    return TrainConfig(**{**values, **kw})


def _unused_parameter_grads(rank):
    """Gradients after averaging when a parameter is reached by no rank, or by one rank only."""
    used, unused, sometimes = (torch.nn.Parameter(torch.ones(n)) for n in (3, 2, 2))
    averager = GradientAverager([used, unused, sometimes], WORLD)
    loss = (used * (rank + 1)).sum() + (sometimes.sum() if rank == 1 else 0)
    loss.backward()
    (mean_loss,) = averager([loss.detach()])
    return {"used": used.grad, "unused": unused.grad, "sometimes": sometimes.grad, "loss": mean_loss}


def _worker(rank, port, folder):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    results = {}
    batches = _global_batches(STEPS, LOCAL_BATCH * WORLD)
    for norm, mode in STEP_CASES:
        results[(norm, mode)] = _train_steps(norm, mode, batches, rank, WORLD, grad_sync=True)
    results["unused"] = _unused_parameter_grads(rank)
    # trainer: an uninterrupted 2-rank run, and the same run stopped at step 2 and resumed (in new Trainers,
    # as a restarted job would build them)
    # images streamed from disk by worker processes, each rank decoding only its shard
    for name, kw in (("ign", {}), ("naign", {"objective": "naign", **NAIGN_SMALL}), ("streamed", _streamed(folder))):
        full, split = os.path.join(folder, f"full_{name}"), os.path.join(folder, f"split_{name}")
        Trainer(_run_config(full, 4, **kw)).fit()
        Trainer(_run_config(split, 2, **kw)).fit()
        Trainer(_run_config(split, 4, **kw), resume=True).fit()
    torch.save(results, os.path.join(folder, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("ddp"))
    from PIL import Image

    os.makedirs(os.path.join(folder, "images"))
    pixels = torch.randint(0, 256, (20, 30, 28, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    for i, image in enumerate(pixels.numpy()):
        Image.fromarray(image).save(os.path.join(folder, "images", f"{i:02d}.png"))
    mp.spawn(_worker, args=(_free_port(), folder), nprocs=WORLD, join=True)
    return folder, [torch.load(os.path.join(folder, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def _losses(run):
    with open(os.path.join(run, "metrics.csv")) as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]


@pytest.mark.parametrize("norm, mode", STEP_CASES)
def test_two_ranks_equal_one_process_on_the_global_batch(two_rank_results, norm, mode):
    _, ranks = two_rank_results
    single_state, single_losses, _ = _train_steps(norm, mode, _global_batches(STEPS, LOCAL_BATCH * WORLD))
    initial = _model(norm).state_dict()
    for rank in range(WORLD):
        state, losses, calls = ranks[rank][(norm, mode)]
        assert calls == STEPS  # one gradient all-reduce per step
        # the logged loss is the global batch's: the mean of the ranks' means over equal halves
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(single_losses), rtol=1e-5, atol=1e-6)
        moved = 0.0
        for name, value in single_state.items():
            torch.testing.assert_close(state[name], value, rtol=1e-4, atol=1e-6, msg=f"{name} on rank {rank}")
            moved = max(moved, (value.float() - initial[name].float()).abs().max().item())
        assert moved > 1e-2  # the weights moved far beyond the tolerance: equality is not the trivial kind


@pytest.mark.parametrize("objective", ["ign", "naign", "streamed"])
def test_two_rank_resume_reproduces_the_uninterrupted_run(two_rank_results, objective):
    folder, _ = two_rank_results
    full, split = _losses(os.path.join(folder, f"full_{objective}")), _losses(os.path.join(folder,
                                                                                           f"split_{objective}"))
    assert [s for s, _ in full] == [1, 2, 3, 4]
    assert split == full
    state = ckpt.load_checkpoint(os.path.join(folder, f"full_{objective}"))
    assert state["meta"]["world_size"] == WORLD
    # one noise stream shared by the ranks: one state, no per-rank copies
    assert "noise_generator" in state["rng"] and not any("_rank" in key for key in state["rng"])


def _final_weights(run):
    return ckpt.load_checkpoint(run)["model"]


@pytest.mark.parametrize("objective", ["ign", "naign", "streamed"])
def test_two_rank_trainer_equals_one_process_on_the_global_batch(two_rank_results, tmp_path, objective):
    """The trainer under 2 ranks (shared noise stream, NAIGN candidates gathered across ranks, streamed data
    sharded by worker processes) trains what one process trains on the global batch."""
    folder, _ = two_rank_results
    kw = {"streamed": _streamed(folder), "naign": {"objective": "naign", **NAIGN_SMALL}}.get(objective, {})
    single = str(tmp_path / "single")
    Trainer(_run_config(single, 4, **kw)).fit()
    two = os.path.join(folder, f"full_{objective}")
    (steps_1, losses_1), (steps_2, losses_2) = zip(*_losses(single)), zip(*_losses(two))
    assert steps_1 == steps_2 == (1, 2, 3, 4)
    torch.testing.assert_close(torch.tensor(losses_2), torch.tensor(losses_1), rtol=1e-4, atol=1e-6)
    w1, w2 = _final_weights(single), _final_weights(os.path.join(single, "checkpoints", "step_00000002"))
    moved = 0.0
    for name, value in w1.items():
        torch.testing.assert_close(_final_weights(two)[name], value, rtol=1e-4, atol=1e-5, msg=name)
        moved = max(moved, (value - w2[name]).abs().max().item())
    # Adam at lr 1e-4 moves a weight about 1e-4 a step: steps 3-4 moved the weights well beyond the tolerance
    # (atol 1e-5), so the equality is not the trivial kind
    assert moved > 1e-4


def test_two_rank_checkpoint_resumes_on_one_rank(two_rank_results, tmp_path):
    folder, _ = two_rank_results
    run = str(tmp_path / "resumed")
    import shutil

    shutil.copytree(os.path.join(folder, "full_ign"), run)
    trainer = Trainer(_run_config(run, 6), resume=True)
    assert trainer.step == 4 and trainer.loader.state_dict() == {"epoch": 0, "position": 4}
    # the next global batch is the one the 2-rank run would have taken: rank r's shard of it is
    # positions r::2 of the same slice of the epoch's permutation
    shards = []
    for rank in range(WORLD):
        loader = InMemoryLoader(trainer.data, 8 // WORLD, seed=0, rank=rank, world_size=WORLD)
        loader.load_state_dict({"epoch": 0, "position": 4})
        shards.append(loader.next_batch())
    expected = torch.cat(shards)
    got = trainer.loader.next_batch()
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, expected.tolist()))
    trainer.loader.load_state_dict({"epoch": 0, "position": 4})
    trainer.fit()
    assert [s for s, _ in _losses(run)] == [1, 2, 3, 4, 5, 6]
    assert ckpt.load_checkpoint(run)["meta"]["world_size"] == 1


def test_torchrun_cli_on_streamed_data_resumes_a_one_rank_run_exactly(two_rank_results, tmp_path):
    """The real command line: NAIGN on images streamed from disk, 2 steps in one process, then 2 more under
    torchrun on 2 ranks; the losses and weights equal one process's uninterrupted 4 steps on the global batch."""
    folder, _ = two_rank_results
    full, run = str(tmp_path / "full"), str(tmp_path / "run")
    Trainer(_run_config(full, 4, **_streamed(folder))).fit()
    Trainer(_run_config(run, 2, **_streamed(folder))).fit()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "ign_fast", "train", "--objective", "naign", "--candidates", "2",
           "--refresh-every", "2", "--data", "images", "--data-root", os.path.join(folder, "images"),
           "--image-size", "28", "--model", "dcgan28", "--width", "8", "--latent-dim", "8", "--num-workers", "1",
           "--batch-size", "8", "--steps", "4", "--checkpoint-every", "2", "--log-every", "1", "--sample-every",
           "1000", "--no-progress", "--out", run, "--resume"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("trained 2 steps (steps 3-4) on 2 ranks") == 1  # printed by rank 0 only
    state = ckpt.load_checkpoint(run)
    assert state["meta"]["step"] == 4 and state["meta"]["world_size"] == 2
    assert state["meta"]["loader"] == ckpt.load_checkpoint(full)["meta"]["loader"]  # 2 epochs of 20 images
    (steps, losses), (steps_full, losses_full) = zip(*_losses(run)), zip(*_losses(full))
    assert steps == steps_full == (1, 2, 3, 4)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(losses_full), rtol=1e-4, atol=1e-6)
    for name, value in _final_weights(full).items():
        torch.testing.assert_close(state["model"][name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_batch_size_must_split_evenly_and_sync_batchnorm_needs_cuda(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="sync_batchnorm needs norm 'batch'"):
        Trainer(TrainConfig(sync_batchnorm=True, norm="group", out=str(tmp_path / "a"), progress=False))
    # claim a 2-rank job without starting a group: both checks come before any collective
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    with pytest.raises(ValueError, match="batch_size .* divisible by the 2 ranks, got 7"):
        Trainer(TrainConfig(data="moons", model="mlp", batch_size=7, out=str(tmp_path / "b"), progress=False))
    with pytest.raises(ValueError, match="sync_batchnorm needs CUDA"):
        Trainer(TrainConfig(norm="batch", sync_batchnorm=True, batch_size=8, device="cpu", out=str(tmp_path / "c"),
                            progress=False))



def test_gradient_average_keeps_unreached_parameters_without_gradient(two_rank_results):
    _, ranks = two_rank_results
    for rank in range(WORLD):
        grads = ranks[rank]["unused"]
        torch.testing.assert_close(grads["used"], torch.full((3,), 1.5))  # (1 + 2) / 2
        torch.testing.assert_close(grads["sometimes"], torch.full((2,), 0.5))  # (0 + 1) / 2
        assert grads["unused"] is None  # as in one process: Adam leaves it alone
        torch.testing.assert_close(grads["loss"], torch.tensor(5.5))  # (3 + (6 + 2)) / 2
