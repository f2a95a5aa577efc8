"""IGNStep(mode="reference") against a deliberately naive step: a deep-copied θ', four plain calls."""
import copy

import pytest
import torch

import ign_fast
from ign_fast.models import DCGAN28, MLP

from conftest import SkipMLP

# the steps run the compiled ops: without the extension they would test the reference path only
pytestmark = pytest.mark.kernels


def naive_loss(model, x, z, distance="l1", weights=(20.0, 20.0, 2.5), ratio=1.5):
    frozen = copy.deepcopy(model)
    for p in frozen.parameters():
        p.requires_grad_(False)

    def d(a, b):
        diff = a - b
        return (diff.abs() if distance == "l1" else diff ** 2).flatten(1).mean(1)

    fx = model(x)
    fz = model(z)
    ff_z = model(fz.detach())
    f_fz = frozen(fz)
    rec, idem, tight = d(fx, x), d(f_fz, fz), -d(ff_z, fz.detach())
    if ratio is not None:
        tight = torch.tanh(tight / (ratio * rec)) * ratio * rec
    return weights[0] * rec.mean() + weights[1] * idem.mean() + weights[2] * tight.mean()


def models():
    return {
        "dcgan28-group": lambda: DCGAN28(latent_dim=8, width=8, norm="group"),
        "dcgan28-batch": lambda: DCGAN28(latent_dim=8, width=8, norm="batch"),
        "mlp": lambda: MLP(6, hidden=16, depth=2),
        "skip": lambda: SkipMLP(6),
    }


def inputs_for(name, batch=5):
    shape = (batch, 6) if name in ("mlp", "skip") else (batch, 1, 28, 28)
    return torch.randn(shape, dtype=torch.float64).tanh(), torch.randn(shape, dtype=torch.float64)


@pytest.mark.parametrize("name", list(models()))
@pytest.mark.parametrize("distance, ratio", [("l1", 1.5), ("l2", None)])
def test_reference_step_matches_naive(name, distance, ratio):
    torch.manual_seed(0)
    model = models()[name]().double()
    naive_model = copy.deepcopy(model)
    x, z = inputs_for(name)
    loss = ign_fast.IGNLoss(distance, tight_clamp_ratio=ratio)
    step = ign_fast.IGNStep(model, torch.optim.SGD(model.parameters(), lr=0.0), loss=loss)
    total = step.forward_loss(x, z)[0]
    total.backward()
    naive_total = naive_loss(naive_model, x, z, distance, ratio=ratio)
    naive_total.backward()
    torch.testing.assert_close(total, naive_total, rtol=1e-10, atol=1e-12)
    for (k, p), q in zip(model.named_parameters(), naive_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=k)
    # running statistics: three calls of θ update them, the copy's call must not
    for (k, b), c in zip(model.named_buffers(), naive_model.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-10, atol=0, msg=k)


def test_step_updates_and_reports_floats():
    model = DCGAN28(latent_dim=8, width=8, norm="group")
    before = [p.detach().clone() for p in model.parameters()]
    step = ign_fast.IGNStep(model, torch.optim.Adam(model.parameters(), 1e-3))
    out = step(torch.rand(4, 1, 28, 28) * 2 - 1, torch.randn(4, 1, 28, 28))
    assert set(out) == {"loss", "rec", "idem", "tight"} and all(isinstance(v, float) for v in out.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_batchnorm_running_stats_counted_three_times():
    model = DCGAN28(latent_dim=8, width=8, norm="batch")
    step = ign_fast.IGNStep(model, torch.optim.Adam(model.parameters(), 1e-3))
    step(torch.rand(4, 1, 28, 28), torch.randn(4, 1, 28, 28))
    counts = {int(b) for k, b in model.named_buffers() if k.endswith("num_batches_tracked")}
    assert counts == {3}  # f(x), f(z), f(sg f(z)); not the copy's call


@pytest.mark.parametrize("make_call, message", [
    (lambda s: s(torch.randn(2, 6), torch.randn(2, 5)), "z must have the per-sample shape of x"),
    (lambda s: s(torch.empty(0, 6), torch.randn(2, 6)), "x must hold at least one sample"),
    (lambda s: s(torch.full((2, 6), float("nan")), torch.randn(2, 6)), "x contains NaN"),
    (lambda s: s(torch.randn(2, 6), torch.randn(2, 6).double()), "z must match x"),
    (lambda s: s(torch.randn(6), torch.randn(6)), "x must have at least 2 dims"),
])
def test_bad_step_inputs(make_call, message):
    model = MLP(6, hidden=8, depth=1)
    step = ign_fast.IGNStep(model, torch.optim.Adam(model.parameters()))
    with pytest.raises(ValueError, match=message):
        make_call(step)


def test_model_with_wrong_output_shape():
    model = torch.nn.Linear(6, 3)
    step = ign_fast.IGNStep(model, torch.optim.Adam(model.parameters()))
    with pytest.raises(ValueError, match="model output must have its input's shape"):
        step(torch.randn(2, 6), torch.randn(2, 6))


def test_bad_constructor_arguments():
    model = MLP(2)
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(TypeError, match="optimizer must be"):
        ign_fast.IGNStep(model, None)
    with pytest.raises(ValueError, match="mode must be one of"):
        ign_fast.IGNStep(model, opt, mode="turbo")
    with pytest.raises(TypeError, match="model must be"):
        ign_fast.IGNStep(lambda x: x, opt)
