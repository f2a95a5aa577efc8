"""The knobs issue 14 adds to the paper's IGN objective: the IGN + IMLE hybrids (IGNLoss(lambda_imle=...), the pull
on the batch's own f(z); NAIGNLoss(lambda_tight=...), the tightness term on NAIGN's pulled samples) and the
tightness warm-up (TrainConfig.tight_warmup). docs/IGN.md measures what they do."""
import copy
import os

import pytest
import torch

import ign_fast
from ign_fast.cli import main
from ign_fast.trainer import TrainConfig, Trainer

from test_step import inputs_for, models, naive_loss

# the steps run the compiled ops: without the extension they would test the reference path only
pytestmark = pytest.mark.kernels


def naive_imle(model, x, z, distance):
    """mean_i d(f(z_j*), x_i) with j* = argmin_j d(f(z_j), x_i), by brute force over every pair."""
    fz = model(z)

    def d(a, b):
        diff = a - b
        return (diff.abs() if distance == "l1" else diff ** 2).flatten(1).mean(1)

    dist = torch.stack([d(fz.detach(), xi.expand_as(fz)) for xi in x])  # [B_x, B_z]
    nearest = dist.argmin(dim=1)
    return d(fz[nearest], x).mean()


@pytest.mark.parametrize("name", list(models()))
@pytest.mark.parametrize("mode", ["reference", "fused"])
@pytest.mark.parametrize("distance, ratio", [("l1", 1.5), ("l2", None)])
def test_imle_pull_adds_the_nearest_f_z_term_with_its_gradient(name, mode, distance, ratio):
    torch.manual_seed(0)
    model = models()[name]().double()
    naive_model = copy.deepcopy(model)
    x, z = inputs_for(name, batch=6)
    loss = ign_fast.IGNLoss(distance, tight_clamp_ratio=ratio, lambda_imle=3.0)
    step = ign_fast.IGNStep(model, torch.optim.SGD(model.parameters(), lr=0.0), loss=loss, mode=mode)
    total = step.forward_loss(x, z)[0]
    total.backward()
    # the naive side: the paper's four calls, then the pull made from a fifth call of f(z) on the same weights
    # (BatchNorm's batch statistics are those of z alone in both)
    naive_total = naive_loss(naive_model, x, z, distance, ratio=ratio) + 3.0 * naive_imle(naive_model, x, z,
                                                                                          distance)
    naive_total.backward()
    torch.testing.assert_close(total, naive_total, rtol=1e-10, atol=1e-12)
    for (k, p), q in zip(model.named_parameters(), naive_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=k)


def test_imle_term_is_reported_only_when_on_and_pulls_f_z_toward_the_data():
    torch.manual_seed(0)
    x = torch.randn(16, 6).tanh()
    z = torch.randn(16, 6)
    nearest = {}
    for lam in (0.0, 20.0):  # as strong as f(x) = x (λ_rec 20), the hybrid recipe's weight
        torch.manual_seed(1)
        model = ign_fast.models.MLP(6, hidden=32, depth=2)
        step = ign_fast.IGNStep(model, torch.optim.Adam(model.parameters(), 1e-2),
                                loss=ign_fast.IGNLoss(lambda_tight=0.0, lambda_imle=lam), mode="fused")
        assert ("imle" in step(x, z)) == (lam > 0)
        for _ in range(150):
            step(x, z)
        with torch.no_grad():  # mean over x of the distance to its nearest f(z)
            nearest[lam] = torch.cdist(x, model(z), p=1).min(dim=1).values.mean().item() / 6
    assert nearest[20.0] < 0.6 * nearest[0.0], nearest


@pytest.mark.parametrize("ratio, idem", [(1.5, 0.0), (None, 2.0)])
def test_naign_tightness_term_matches_naive_float64(ratio, idem):
    torch.manual_seed(0)
    model = ign_fast.models.MLP(2, hidden=16, depth=2).double()
    naive_model = copy.deepcopy(model)
    x = torch.randn(6, 2, dtype=torch.float64)
    pool = torch.randn(24, 2, dtype=torch.float64)
    loss = ign_fast.NAIGNLoss("l2", lambda_rec=2.0, lambda_imle=3.0, lambda_idem=idem, candidates_per_sample=4,
                              lambda_tight=0.7, tight_clamp_ratio=ratio)
    step = ign_fast.NAIGNStep(model, torch.optim.SGD(model.parameters(), lr=0.0), loss=loss)
    total = step.forward_loss(x, pool)[0]
    total.backward()

    def d(a, b):
        return ((a - b) ** 2).mean(-1)

    with torch.no_grad():
        nearest = d(x[:, None, :], naive_model(pool)[None]).argmin(1)
    frozen = copy.deepcopy(naive_model).requires_grad_(False)
    fx, f_znn = naive_model(x), naive_model(pool[nearest])
    rec = d(fx, x)
    tight = -d(naive_model(f_znn.detach()), f_znn.detach())
    if ratio is not None:
        tight = torch.tanh(tight / (ratio * rec)) * ratio * rec
    naive = (2.0 * rec.mean() + 3.0 * d(f_znn, x).mean() + idem * d(frozen(f_znn), f_znn).mean()
             + 0.7 * tight.mean())
    naive.backward()
    torch.testing.assert_close(total, naive, rtol=1e-12, atol=0)
    for p, q in zip(model.parameters(), naive_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-14)
    assert "tight" in step(x, pool) and "tight" not in ign_fast.NAIGNStep(
        model, torch.optim.SGD(model.parameters(), lr=0.0), loss=ign_fast.NAIGNLoss(candidates_per_sample=4))(x, pool)


def test_imle_weight_is_checked():
    with pytest.raises(ValueError, match="lambda_imle"):
        ign_fast.IGNLoss(lambda_imle=-1.0)
    assert ign_fast.IGNLoss().lambda_imle == 0.0  # the paper's objective unless asked
    assert TrainConfig(objective="ign").resolved().lambda_imle == 0.0
    assert TrainConfig(objective="naign").resolved().lambda_imle == 1.0
    assert TrainConfig(objective="ign").resolved().lambda_tight == 2.5
    assert TrainConfig(objective="naign").resolved().lambda_tight == 0.0
    with pytest.raises(ValueError, match="lambda_tight"):
        ign_fast.NAIGNLoss(lambda_tight=-1.0)


def _config(tmp_path, out, **kw):
    values = dict(objective="ign", data="moons", model="mlp", batch_size=16, steps=6, lr=1e-3, tight_warmup=4,
                  checkpoint_every=3, sample_every=100, log_every=1, progress=False, out=str(tmp_path / out))
    return TrainConfig(**{**values, **kw})


def _losses(run):
    with open(os.path.join(run, "metrics.csv")) as f:
        return f.read().splitlines()[1:]


def test_tight_warmup_values_exact_resume_and_errors(tmp_path):
    full = Trainer(_config(tmp_path, "full"))
    assert [full.tightness_weight(s) / 2.5 for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    exp = Trainer(_config(tmp_path, "exp", tight_warmup_shape="exp"))
    assert exp.tightness_weight(0) == 0.0
    assert exp.tightness_weight(4) == pytest.approx(2.5 * (1 - torch.tensor(-5.0).exp().item()))
    full.fit()
    assert full.step_fn.loss.lambda_tight == pytest.approx(2.5)  # the last update's weight
    split = Trainer(_config(tmp_path, "split"))
    split.fit(steps=3)
    assert split.step_fn.loss.lambda_tight == pytest.approx(2.5 * 2 / 4)  # update 3 of 4 on the ramp
    Trainer(_config(tmp_path, "split"), resume=True).fit()
    assert _losses(str(tmp_path / "split")) == _losses(str(tmp_path / "full"))
    Trainer(_config(tmp_path, "none", tight_warmup=0)).fit()
    assert _losses(str(tmp_path / "none"))[:4] != _losses(str(tmp_path / "full"))[:4]
    with pytest.raises(ValueError, match="tight_warmup needs a tightness term"):
        Trainer(_config(tmp_path, "n", objective="naign"))
    hybrid = Trainer(_config(tmp_path, "h", objective="naign", lambda_tight=1.0, candidates=2))
    hybrid.fit()  # NAIGN with the tightness term warms it up the same way
    assert hybrid.step_fn.loss.lambda_tight == pytest.approx(1.0)
    with pytest.raises(ValueError, match="tight_warmup needs step_mode"):
        Trainer(_config(tmp_path, "g", step_mode="graph"))
    with pytest.raises(ValueError, match="tight_warmup must be an integer >= 0"):
        Trainer(_config(tmp_path, "b", tight_warmup=-1))
    with pytest.raises(ValueError, match="tight_warmup_shape must be one of linear, exp"):
        Trainer(_config(tmp_path, "s", tight_warmup_shape="cosine"))


def test_cli_trains_the_hybrid_with_a_warmup_and_refuses_a_bad_shape(tmp_path, capsys):
    run = str(tmp_path / "run")
    args = ["train", "--objective", "ign", "--data", "moons", "--model", "mlp", "--batch-size", "16", "--steps",
            "4", "--out", run, "--no-progress", "--log-every", "1", "--checkpoint-every", "4", "--sample-every",
            "100", "--lambda-imle", "20", "--tight-warmup", "2", "--tight-warmup-shape", "exp"]
    assert main(args) == 0
    with open(os.path.join(run, "metrics.csv")) as f:
        assert f.readline().strip().split(",")[-1] == "imle"
    capsys.readouterr()
    assert main(args[:-1] + ["cosine", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "tight_warmup_shape must be one of linear, exp" in err
