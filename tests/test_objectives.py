"""IGNLoss against a naive transcription of the spec, each term alone, and the clamp's limit at rec = 0."""
import pytest
import torch

import ign_fast
from ign_fast.objectives import clamp_tight


def naive_terms(x, fx, fz, f_fz, ff_z, distance, ratio):
    def d(a, b):
        diff = a - b
        return (diff.abs() if distance == "l1" else diff ** 2).flatten(1).mean(1)

    rec = d(fx, x)
    idem = d(f_fz, fz)
    tight = -d(ff_z, fz.detach())
    if ratio is not None:
        tight = torch.tanh(tight / (ratio * rec)) * ratio * rec
    return rec, idem, tight


def make_inputs(batch=4, shape=(1, 5, 6)):
    return [torch.randn(batch, *shape, dtype=torch.float64, requires_grad=True) for _ in range(5)]


@pytest.mark.parametrize("distance", ["l1", "l2"])
@pytest.mark.parametrize("ratio", [1.5, None])
def test_matches_naive_values_and_gradients(distance, ratio):
    inputs = make_inputs()
    loss = ign_fast.IGNLoss(distance, 20.0, 20.0, 2.5, ratio)
    total, rec, idem, tight = loss(*inputs)
    grads = torch.autograd.grad(total, inputs[1:])
    n_rec, n_idem, n_tight = naive_terms(*inputs, distance, ratio)
    n_total = 20 * n_rec.mean() + 20 * n_idem.mean() + 2.5 * n_tight.mean()
    n_grads = torch.autograd.grad(n_total, inputs[1:])
    for ours, theirs in zip((total, rec, idem, tight) + grads, (n_total, n_rec, n_idem, n_tight) + n_grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("distance", ["l1", "l2"])
@pytest.mark.parametrize("ratio", [1.5, None])
def test_gradcheck(distance, ratio):
    inputs = make_inputs(batch=3, shape=(2, 3))
    # Finite differences cannot see a stop-gradient: the tight term's sg(fz) moves when fz is perturbed.
    # So check all inputs with the tight term off, and the tight term with fz held constant.
    no_tight = ign_fast.IGNLoss(distance, 2.0, 3.0, 0.0, ratio)
    assert torch.autograd.gradcheck(lambda *t: no_tight(*t)[0], inputs)
    full = ign_fast.IGNLoss(distance, 2.0, 3.0, 0.5, ratio)
    x, fx, fz, f_fz, ff_z = inputs
    fz_const = fz.detach()
    assert torch.autograd.gradcheck(lambda x, fx, f_fz, ff_z: full(x, fx, fz_const, f_fz, ff_z)[0],
                                    (x, fx, f_fz, ff_z))


@pytest.mark.parametrize("term, weights", [("rec", (1.0, 0.0, 0.0)), ("idem", (0.0, 1.0, 0.0)),
                                           ("tight", (0.0, 0.0, 1.0))])
def test_each_term_alone_reaches_only_its_inputs(term, weights):
    x, fx, fz, f_fz, ff_z = make_inputs()
    loss = ign_fast.IGNLoss("l1", *weights, tight_clamp_ratio=None)
    total = loss(x, fx, fz, f_fz, ff_z)[0]
    g = dict(zip(["x", "fx", "fz", "f_fz", "ff_z"], torch.autograd.grad(total, [x, fx, fz, f_fz, ff_z],
                                                                         allow_unused=True)))
    nonzero = {k for k, v in g.items() if v is not None and v.abs().sum() > 0}
    expected = {"rec": {"x", "fx"}, "idem": {"fz", "f_fz"}, "tight": {"ff_z"}}[term]
    assert nonzero == expected  # tight uses sg(fz): no gradient into fz


def test_clamp_reaches_rec():
    # with the clamp on, tight_i depends on rec_i (not detached), so the tight term alone moves fx
    x, fx, fz, f_fz, ff_z = make_inputs()
    total = ign_fast.IGNLoss("l1", 0.0, 0.0, 1.0, tight_clamp_ratio=0.01)(x, fx, fz, f_fz, ff_z)[0]
    assert torch.autograd.grad(total, fx)[0].abs().sum() > 0


@pytest.mark.parametrize("distance", ["l1", "l2"])
def test_rec_zero_is_finite_and_takes_the_limit(distance):
    x, _, fz, f_fz, ff_z = make_inputs(batch=3)
    fx = x.detach().clone().requires_grad_(True)  # rec_i = 0 exactly
    total, rec, idem, tight = ign_fast.IGNLoss(distance)(x, fx, fz, f_fz, ff_z)
    assert torch.equal(rec, torch.zeros_like(rec))
    assert torch.equal(tight, torch.zeros_like(tight))  # lim_{rec->0} tanh(t/(a rec)) a rec = 0
    grads = torch.autograd.grad(total, [fx, fz, f_fz, ff_z])
    assert all(torch.isfinite(g).all() for g in grads)


def test_clamp_limit_and_smoothness():
    rec = torch.tensor([0.0, 1e-14, 1e-3, 0.5], dtype=torch.float64, requires_grad=True)
    tight = torch.tensor([-1.0, -1.0, -1.0, -0.1], dtype=torch.float64, requires_grad=True)
    out = clamp_tight(tight, rec, 1.5)
    out.sum().backward()
    assert torch.isfinite(rec.grad).all() and torch.isfinite(tight.grad).all()
    # near 0 the clamp is -a·rec, so d/drec = -a; away from 0 it is the smooth tanh
    torch.testing.assert_close(rec.grad[:3], torch.full((3,), -1.5, dtype=torch.float64))
    torch.testing.assert_close(out[3], torch.tanh(torch.tensor(-0.1 / 0.75, dtype=torch.float64)) * 0.75)


@pytest.mark.parametrize("kwargs, message", [
    (dict(distance="l3"), "distance must be"), (dict(lambda_rec=-1.0), "lambda_rec must be"),
    (dict(tight_clamp_ratio=0), "tight_clamp_ratio must be"), (dict(lambda_tight="x"), "lambda_tight must be"),
])
def test_bad_hyperparameters(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        ign_fast.IGNLoss(**kwargs)


def test_bad_shapes_name_the_argument():
    x, fx, fz, f_fz, ff_z = make_inputs()
    with pytest.raises(ValueError, match="fx must have the shape of x"):
        ign_fast.IGNLoss()(x, fx[:, :, :3], fz, f_fz, ff_z)
    with pytest.raises(ValueError, match="ff_z must have the shape of fz"):
        ign_fast.IGNLoss()(x, fx, fz, f_fz, ff_z[:2])
