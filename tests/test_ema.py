"""EMA of the weights: the average a hand computation gives, integer buffers copied, warm-up, state round trip."""
import copy

import pytest
import torch

from ign_fast.ema import EMA


def test_ema_is_the_exponential_average_with_warm_up():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = EMA(model, decay=0.9)
    expected = {k: v.detach().clone().double() for k, v in model.state_dict().items()}
    for t in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(4, 3))  # moves BatchNorm's running statistics and its integer counter
        ema.update(model)
        decay = min(0.9, (1 + t) / (10 + t))
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                expected[k] = decay * expected[k] + (1 - decay) * v.double()
    for k, v in ema.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v.double(), expected[k], rtol=1e-5, atol=1e-6)
    assert int(ema.state_dict()["1.num_batches_tracked"]) == 30  # copied, not averaged


def test_applied_swaps_the_average_in_and_the_trained_weights_back():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.5)
    trained = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    after = copy.deepcopy(model.state_dict())
    with ema.applied(model):
        assert torch.equal(model.weight, ema.state_dict()["weight"])
        assert not torch.equal(model.weight, after["weight"]) and not torch.equal(model.weight, trained["weight"])
    assert torch.equal(model.weight, after["weight"])


def test_state_round_trip_and_bad_input():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, 0.99)
    ema.update(model)
    other = EMA(torch.nn.Linear(3, 2), 0.99)
    other.load_state_dict(ema.state_dict(), updates=ema.updates)
    assert other.updates == 1 and all(torch.equal(a, b) for a, b in zip(other.shadow.values(), ema.shadow.values()))
    with pytest.raises(ValueError, match="decay must be a number in \\(0, 1\\)"):
        EMA(model, 1.0)
    with pytest.raises(ValueError, match="EMA state lacks 1 of the model's tensors, e.g. 'bias'"):
        other.load_state_dict({"weight": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match=r"EMA state 'weight' must have shape \(2, 3\), got \(3, 3\)"):
        other.load_state_dict({"weight": torch.zeros(3, 3), "bias": torch.zeros(2)})
