"""NAIGN: the IMLE term's gradient against a naive computation, and a tiny run on 2-D data that covers
the modes a collapsed generator misses."""
import copy

import pytest
import torch

import ign_fast
from ign_fast import metrics
from ign_fast.data import TOY_MODES
from ign_fast.models import MLP
from ign_fast.trainer import TrainConfig, Trainer
from ign_fast.inference import generate


def test_naign_loss_matches_naive_float64():
    torch.manual_seed(0)
    model = MLP(2, hidden=16, depth=2).double()
    naive_model = copy.deepcopy(model)
    x = torch.randn(6, 2, dtype=torch.float64)
    pool = torch.randn(24, 2, dtype=torch.float64)
    step = ign_fast.NAIGNStep(model, torch.optim.SGD(model.parameters(), lr=0.0),
                              loss=ign_fast.NAIGNLoss("l2", lambda_rec=2.0, lambda_imle=3.0, candidates_per_sample=4))
    total = step.forward_loss(x, pool)[0]
    total.backward()
    with torch.no_grad():
        candidates = naive_model(pool)
    nearest = ((x[:, None, :] - candidates[None]) ** 2).mean(-1).argmin(1)
    fx, f_znn = naive_model(x), naive_model(pool[nearest])
    naive = 2.0 * ((fx - x) ** 2).mean(1).mean() + 3.0 * ((f_znn - x) ** 2).mean(1).mean()
    naive.backward()
    torch.testing.assert_close(total, naive, rtol=1e-12, atol=0)
    for p, q in zip(model.parameters(), naive_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-14)


def test_tiny_naign_run_covers_more_modes_than_a_collapsed_generator(tmp_path):
    config = TrainConfig(objective="naign", data="8gaussians", model="mlp", steps=600, lr=2e-3, out=str(tmp_path),
                         progress=False, sample_every=10_000, checkpoint_every=10_000)
    trainer = Trainer(config)
    trainer.fit()
    z = trainer.prior.sample(2000, generator=torch.Generator().manual_seed(0))
    samples = generate(trainer.model, z)
    modes = TOY_MODES["8gaussians"]
    ours = metrics.toy_mode_coverage(samples, modes, radius=0.5)
    # the constructed baseline: a generator collapsed onto one mode (plus its spread), as IGN can
    collapsed = modes[0] + 0.1 * torch.randn(2000, 2, generator=torch.Generator().manual_seed(1))
    baseline = metrics.toy_mode_coverage(collapsed, modes, radius=0.5)
    assert baseline["modes_covered"] == pytest.approx(1 / 8)
    assert ours["modes_covered"] >= 6 / 8, ours
    assert ours["modes_covered"] > baseline["modes_covered"]


def test_candidates_are_reused_between_pool_refreshes():
    # R = 3: calls 0 and 3 draw a pool and generate its candidates; calls 1 and 2 search the candidates made
    # at call 0 (weights θ0), while the pulled sample f(z*) is computed with the current weights
    torch.manual_seed(0)
    model = MLP(2, hidden=16, depth=2).double()
    g = torch.Generator().manual_seed(3)
    step = ign_fast.NAIGNStep(model, torch.optim.Adam(model.parameters(), lr=1e-2),
                              loss=ign_fast.NAIGNLoss("l2", candidates_per_sample=4, refresh_every=3),
                              sample_noise=lambda n: torch.randn(n, 2, generator=g, dtype=torch.float64))
    batches = [torch.randn(5, 2, dtype=torch.float64) for _ in range(4)]
    theta0 = copy.deepcopy(model)
    step(batches[0])
    pool0, candidates0 = step.pool, step.candidates
    with torch.no_grad():
        torch.testing.assert_close(candidates0, theta0(pool0), rtol=1e-12, atol=0)
    for x in batches[1:3]:
        current = copy.deepcopy(model)
        out = step(x)
        assert step.pool is pool0 and step.candidates is candidates0  # nothing drawn, nothing generated
        nearest = ((x[:, None, :] - candidates0[None]) ** 2).mean(-1).argmin(1)
        with torch.no_grad():
            naive = ((current(x) - x) ** 2).mean() + ((current(pool0[nearest]) - x) ** 2).mean()
            assert not torch.allclose(current(pool0), candidates0)  # the weights moved: stale on purpose
        assert out["loss"] == pytest.approx(float(naive), rel=1e-12)
    step(batches[3])
    assert step.pool is not pool0 and step.candidates is not candidates0


def test_toy_sets_resolve_their_own_step_count():
    # two moons and rings need 6,000 steps for their samples to reach the curves (docs/NAIGN.md, toy sets)
    assert TrainConfig(objective="naign", data="moons").resolved().steps == 6000
    assert TrainConfig(objective="naign", data="mnist5k").resolved().steps == 2000
    assert TrainConfig(objective="ign", data="moons").resolved().steps == 2000
    assert TrainConfig(objective="naign", data="rings", steps=10).resolved().steps == 10


def test_candidate_chunk_follows_the_device_and_batch_coupling():
    from ign_fast.models import DCGAN28
    from ign_fast.naign import CANDIDATE_CHUNK, CPU_CANDIDATE_CHUNK, candidate_chunk_for

    group, batch = DCGAN28(1, 8, 4, norm="group"), DCGAN28(1, 8, 4, norm="batch")
    assert CPU_CANDIDATE_CHUNK < CANDIDATE_CHUNK
    assert candidate_chunk_for(group, "cpu") == CPU_CANDIDATE_CHUNK
    assert candidate_chunk_for(group, torch.device("cuda", 0)) == CANDIDATE_CHUNK
    assert candidate_chunk_for(batch, "cpu") == CANDIDATE_CHUNK  # the chunk is part of what BatchNorm computes
    batch.eval()
    assert candidate_chunk_for(batch, "cpu") == CPU_CANDIDATE_CHUNK  # running statistics: no coupling


def test_candidates_do_not_depend_on_the_chunk_without_batch_coupling():
    from ign_fast.models import DCGAN28
    from ign_fast.naign import generate_candidates

    torch.manual_seed(0)
    model = DCGAN28(1, 8, 4, norm="group").double()
    z = torch.randn(37, 1, 28, 28, dtype=torch.float64)  # not a multiple of either chunk
    torch.testing.assert_close(generate_candidates(model, z, 5), generate_candidates(model, z, 1024),
                               rtol=1e-12, atol=1e-12)


def test_step_uses_the_cpu_chunk_when_given_none(monkeypatch):
    import ign_fast.naign as naign
    from ign_fast.models import DCGAN28

    seen = []
    real = naign.generate_candidates
    monkeypatch.setattr(naign, "generate_candidates", lambda m, z, chunk: seen.append(chunk) or real(m, z, chunk))
    model = DCGAN28(1, 8, 4, norm="group")
    step = ign_fast.NAIGNStep(model, torch.optim.Adam(model.parameters()),
                              loss=ign_fast.NAIGNLoss(candidates_per_sample=2))
    step(torch.rand(3, 1, 28, 28) * 2 - 1, torch.randn(6, 1, 28, 28))
    given = ign_fast.NAIGNStep(model, torch.optim.Adam(model.parameters()),
                               loss=ign_fast.NAIGNLoss(candidates_per_sample=2), candidate_chunk=4)
    given(torch.rand(3, 1, 28, 28) * 2 - 1, torch.randn(6, 1, 28, 28))
    assert seen == [naign.CPU_CANDIDATE_CHUNK, 4]
