"""Steps whose loss is NaN or inf: skipped without touching the weights, counted, and N in a row stop the
run with its last good checkpoint intact."""
import copy
import os

import pytest
import torch

import ign_fast
from ign_fast import checkpoint as ckpt
from ign_fast.cli import main
from ign_fast.models import MLP
from ign_fast.naign import NAIGNLoss
from ign_fast.objectives import IGNLoss
from ign_fast.trainer import NonFiniteTrainingError, TrainConfig, Trainer

from conftest import requires_cuda


def poison_losses(monkeypatch, loss_class, bad_calls, value=float("nan")):
    """Make loss_class.forward return `value` as its total on the given 1-based calls (a model that blew up)."""
    original = loss_class.forward
    calls = {"n": 0}

    def forward(self, *args):
        calls["n"] += 1
        total, *rest = original(self, *args)
        if calls["n"] in bad_calls:
            total = total * value
        return (total, *rest)

    monkeypatch.setattr(loss_class, "forward", forward)
    return calls


def snapshot(model, optimizer):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())


def assert_same_state(a, b):
    """Weights, buffers and the whole optimizer state (every moment and step counter, and the hyperparameters)
    are equal."""
    (ma, oa), (mb, ob) = a, b
    assert ma.keys() == mb.keys()
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for index, state in oa["state"].items():
        assert state.keys() == ob["state"][index].keys()
        for key, value in state.items():
            assert torch.equal(value, ob["state"][index][key]), (index, key)


@pytest.mark.parametrize("mode", ["reference", "fused"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_ign_step_skips_a_nonfinite_update(monkeypatch, mode, value):
    poison_losses(monkeypatch, IGNLoss, {2}, value)
    model = MLP(4, hidden=8, depth=2)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    step = ign_fast.IGNStep(model, opt, mode=mode)
    x, z = torch.randn(6, 4), torch.randn(6, 4)
    step(x, z)
    assert not step.last_skipped
    before = snapshot(model, opt)
    step(x, z)  # poisoned
    assert step.last_skipped
    assert all(p.grad is None for p in model.parameters())  # the poisoned gradients were dropped
    assert_same_state(before, snapshot(model, opt))
    step(x, z)  # finite again: updates
    assert not step.last_skipped
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in before[0].items())


@requires_cuda
@pytest.mark.parametrize("objective", ["ign", "naign"])
def test_cuda_graph_step_skips_a_nonfinite_update_on_the_device(objective):
    # calls 1-3 warm up, 4 captures, 5-8 replay: a NaN in the batch (data, so a replayed graph sees it too,
    # which a Python-level poison of the loss would not) at a warm-up (call 2) and at a replay (call 6)
    model = MLP(4, hidden=8, depth=2).cuda()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    if objective == "ign":
        step = ign_fast.IGNStep(model, opt, mode="graph", check_inputs=False)
    else:
        step = ign_fast.NAIGNStep(model, opt, loss=NAIGNLoss(candidates_per_sample=2), mode="graph",
                                  check_inputs=False)
    assert step.graph_runner is not None
    g = torch.Generator(device="cuda").manual_seed(0)
    for call in range(1, 9):
        x = torch.randn(6, 4, device="cuda", generator=g)
        other = torch.randn(6 if objective == "ign" else 12, 4, device="cuda", generator=g)
        if call in (2, 6):
            x[0, 0] = float("nan")
        before = snapshot(model, opt)
        out = step(x, other)
        if call in (2, 6):
            assert step.last_skipped and out["loss"] != out["loss"]
            assert_same_state(before, snapshot(model, opt))
        else:
            assert not step.last_skipped and out["loss"] == out["loss"]
    assert step.graph_runner.graphs  # calls 5-8 were replays


def test_naign_step_skips_a_nonfinite_update(monkeypatch):
    poison_losses(monkeypatch, NAIGNLoss, {2})
    model = MLP(4, hidden=8, depth=2)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    step = ign_fast.NAIGNStep(model, opt, loss=NAIGNLoss(candidates_per_sample=2))
    x = torch.randn(6, 4)
    step(x, torch.randn(12, 4))
    before = snapshot(model, opt)
    step(x, torch.randn(12, 4))
    assert step.last_skipped
    assert_same_state(before, snapshot(model, opt))
    step(x, torch.randn(12, 4))
    assert not step.last_skipped


def tiny_config(out, steps, **kw):
    return TrainConfig(objective="ign", data="moons", model="mlp", batch_size=8, steps=steps, checkpoint_every=1,
                       keep=20, log_every=1, sample_every=1000, progress=False, out=out, **kw)


def test_trainer_skips_counts_and_saves_only_finite_states(monkeypatch, tmp_path, capsys):
    run = str(tmp_path / "run")
    poison_losses(monkeypatch, IGNLoss, {3, 4})
    trainer = Trainer(tiny_config(run, 6))
    summary = trainer.fit()
    assert summary["nonfinite_steps"] == 2 and trainer.step == 6
    saved = sorted(n for n in os.listdir(os.path.join(run, "checkpoints")) if n.startswith("step_"))
    assert saved == [f"step_{s:08d}" for s in (1, 2, 5, 6)]  # none written at a skipped step
    err = capsys.readouterr().err
    assert "step 3: loss is not finite, update skipped (1 in a row" in err and "(2 in a row" in err
    for name, value in ckpt.load_checkpoint(os.path.join(run, "checkpoints", "step_00000002"))["model"].items():
        assert torch.isfinite(value).all(), name


def test_trainer_stops_after_max_nonfinite_steps_in_a_row(monkeypatch, tmp_path):
    run = str(tmp_path / "run")
    poison_losses(monkeypatch, IGNLoss, set(range(3, 100)))
    trainer = Trainer(tiny_config(run, 20, max_nonfinite_steps=3))
    with pytest.raises(NonFiniteTrainingError, match=r"stopped at step 5: 3 steps in a row .*step_00000002"):
        trainer.fit()
    state = ckpt.load_checkpoint(run)
    assert state["meta"]["step"] == 2
    for name, value in trainer.model.state_dict().items():  # the skips kept the last good weights
        assert torch.equal(state["model"][name], value), name


def test_cli_reports_the_stop_in_one_line(monkeypatch, tmp_path, capsys):
    poison_losses(monkeypatch, IGNLoss, set(range(1, 100)))
    argv = ["train", "--objective", "ign", "--data", "moons", "--model", "mlp", "--batch-size", "8", "--steps", "10",
            "--no-progress", "--max-nonfinite-steps", "2", "--out", str(tmp_path / "run")]
    assert main(argv) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ign-fast train: error")]
    assert len(err) == 1 and "max_nonfinite_steps=2" in err[0] and "none written yet" in err[0]


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_max_nonfinite_steps_is_validated(tmp_path, bad):
    with pytest.raises(ValueError, match="max_nonfinite_steps must be a positive integer"):
        Trainer(tiny_config(str(tmp_path / "r"), 2, max_nonfinite_steps=bad))
