"""Malformed inputs at every public entry point of training: each is refused with one line that names the
argument and says what was expected, before any computation runs on it."""
import math

import pytest
import torch

import ign_fast
from ign_fast.data import InMemoryLoader
from ign_fast.models import MLP
from ign_fast.naign import NAIGNLoss
from ign_fast.trainer import TrainConfig, check_data, validate_config

DIM = 4


def model():
    torch.manual_seed(0)
    return MLP(DIM, hidden=8, depth=2)


def ign_step(net=None, **kw):
    net = net or model()
    return ign_fast.IGNStep(net, torch.optim.Adam(net.parameters()), **kw)


def naign_step(net=None, **kw):
    net = net or model()
    kw.setdefault("loss", NAIGNLoss(candidates_per_sample=2))
    return ign_fast.NAIGNStep(net, torch.optim.Adam(net.parameters()), **kw)


def x(n=4, dim=DIM, dtype=torch.float32):
    return torch.randn(n, dim, dtype=dtype)


def with_value(t, value):
    t = t.clone()
    t.view(-1)[1] = value
    return t


def config(**kw):
    return TrainConfig(**kw).resolved()


# (case, call, exception, text that must open or appear in the message)
CASES = [
    # IGNStep(x, z)
    ("ign x rank 1", lambda: ign_step()(torch.randn(DIM), x()), ValueError, "x must have at least 2 dims"),
    ("ign z per-sample shape", lambda: ign_step()(x(), x(dim=5)), ValueError, "z must have the per-sample shape"),
    ("ign z dtype", lambda: ign_step()(x(), x(dtype=torch.float64)), ValueError, "z must match x in dtype"),
    ("ign x integer", lambda: ign_step()(x().long(), x()), TypeError, "x must be float64, float32"),
    ("ign x not a tensor", lambda: ign_step()(x().tolist(), x()), TypeError, "x must be a torch.Tensor"),
    ("ign z not a tensor", lambda: ign_step()(x(), None), TypeError, "z must be a torch.Tensor"),
    ("ign x NaN", lambda: ign_step()(with_value(x(), math.nan), x()), ValueError, "x contains NaN or inf"),
    ("ign z inf", lambda: ign_step()(x(), with_value(x(), math.inf)), ValueError, "z contains NaN or inf"),
    ("ign empty batch", lambda: ign_step()(x(0), x(0)), ValueError, "x must hold at least one sample"),
    ("ign empty z", lambda: ign_step()(x(), x(0)), ValueError, "z must hold at least one sample"),
    ("ign x dtype vs model", lambda: ign_step()(x(dtype=torch.float64), x(dtype=torch.float64)), TypeError,
     "x must have the model's parameter dtype"),
    ("ign x device vs model", lambda: ign_step()(torch.empty(4, DIM, device="meta"),
                                                 torch.empty(4, DIM, device="meta")), ValueError,
     "x must be on the model's device"),
    ("ign output shape", lambda: ign_step(torch.nn.Linear(DIM, 3))(x(), x()), ValueError,
     "model output must have its input's shape"),
    ("ign model", lambda: ign_fast.IGNStep(lambda t: t, torch.optim.SGD([torch.zeros(1)], 0.1)), TypeError,
     "model must be a torch.nn.Module"),
    ("ign optimizer", lambda: ign_fast.IGNStep(model(), "adam"), TypeError, "optimizer must be"),
    ("ign mode", lambda: ign_step(mode="turbo"), ValueError, "mode must be one of"),
    ("ign amp_dtype", lambda: ign_step(amp_dtype=torch.int8), ValueError, "amp_dtype must be"),
    ("ign skip_nonfinite", lambda: ign_step(skip_nonfinite="yes"), TypeError, "skip_nonfinite must be a bool"),
    ("ign loss", lambda: ign_step(loss=NAIGNLoss()), TypeError, "loss must be an ign_fast.IGNLoss"),
    # NAIGNStep(x, z_pool)
    ("naign z_pool shape", lambda: naign_step()(x(), x(8, dim=5)), ValueError,
     "z_pool must have the per-sample shape"),
    ("naign z_pool empty", lambda: naign_step()(x(), x(0)), ValueError, "z_pool must hold at least one sample"),
    ("naign z_pool size", lambda: naign_step()(x(), x(5)), ValueError,
     r"z_pool must hold candidates_per_sample x batch = 2 x 4 = 8 noise samples, got 5"),
    ("naign z_pool dtype", lambda: naign_step()(x(), x(8, dtype=torch.float64)), ValueError,
     "z_pool must match x in dtype"),
    ("naign z_pool NaN", lambda: naign_step()(x(), with_value(x(8), math.nan)), ValueError,
     "z_pool contains NaN or inf"),
    ("naign x NaN", lambda: naign_step()(with_value(x(), math.inf), x(8)), ValueError, "x contains NaN or inf"),
    ("naign empty batch", lambda: naign_step()(x(0), x(8)), ValueError, "x must hold at least one sample"),
    ("naign x rank 1", lambda: naign_step()(torch.randn(DIM), x(8)), ValueError, "x must have at least 2 dims"),
    ("naign x dtype vs model", lambda: naign_step()(x(dtype=torch.float64), x(8, dtype=torch.float64)), TypeError,
     "x must have the model's parameter dtype"),
    ("naign output shape", lambda: naign_step(torch.nn.Linear(DIM, 3))(x(), x(8)), ValueError,
     "model output must have its input's shape"),
    ("naign no noise", lambda: naign_step()(x()), ValueError, "z_pool must be given"),
    ("naign noise shape", lambda: naign_step(sample_noise=lambda n: torch.randn(n, DIM + 1))(x()), ValueError,
     "sample_noise(8) must return a tensor of shape (8, 4)"),
    ("naign sample_noise", lambda: naign_step(sample_noise=3), TypeError, "sample_noise must be callable"),
    ("naign candidate_chunk", lambda: naign_step(candidate_chunk=0), ValueError,
     "candidate_chunk must be a positive integer"),
    ("naign loss", lambda: naign_step(loss=ign_fast.IGNLoss()), TypeError, "loss must be an ign_fast.NAIGNLoss"),
    ("naign model", lambda: ign_fast.NAIGNStep(None, None), TypeError, "model must be a torch.nn.Module"),
    # InMemoryLoader (the data is checked once here, not per batch)
    ("loader NaN", lambda: InMemoryLoader(with_value(x(10), math.nan), 2), ValueError, "data must be finite"),
    ("loader inf in a tuple", lambda: InMemoryLoader((torch.zeros(10), with_value(x(10), -math.inf)), 2),
     ValueError, "data[1] must be finite"),
    ("loader empty", lambda: InMemoryLoader(x(0), 2), ValueError, "len(data) must be >= 1"),
    ("loader not a tensor", lambda: InMemoryLoader([[1.0, 2.0]], 1), TypeError, "data must be a tensor"),
    ("loader first dims", lambda: InMemoryLoader((x(10), x(9)), 2), ValueError,
     "data tensors must share a non-empty first dim"),
    ("loader batch_size", lambda: InMemoryLoader(x(10), 0), ValueError, "batch_size must be >= 1"),
    ("loader rank", lambda: InMemoryLoader(x(10), 2, rank=2, world_size=2), ValueError, "rank must be < world_size"),
    ("loader batch > shard", lambda: InMemoryLoader(x(10), 6, world_size=2), ValueError,
     "batch_size (6) must be at most the number of samples each process sees per epoch (5 of 10)"),
    # the trainer's data and config
    ("trainer data NaN", lambda: check_data("moons", with_value(x(10), math.nan)), ValueError,
     "data 'moons' contains NaN or inf in 1 samples (first: index 0)"),
    ("trainer data integer", lambda: check_data("moons", torch.zeros(10, 2, dtype=torch.long)), ValueError,
     "data 'moons' must load as a float tensor"),
    ("trainer data empty", lambda: check_data("images", torch.zeros(0, 3, 8, 8)), ValueError,
     "data 'images' must have shape [N, ...] with N >= 1"),
    ("config beta1", lambda: validate_config(config(beta1=1.0)), ValueError, "beta1 must be a number in [0, 1)"),
    ("config beta2", lambda: validate_config(config(beta2=-0.1)), ValueError, "beta2 must be a number in [0, 1)"),
    ("config seed", lambda: validate_config(config(seed=-1)), ValueError, "seed must be an integer >= 0"),
    ("config image_size", lambda: validate_config(config(image_size=0)), ValueError, "image_size must be"),
    ("config out", lambda: validate_config(config(out="")), ValueError, "out must be a non-empty path"),
    ("config progress", lambda: validate_config(config(progress="no")), ValueError, "progress must be True or False"),
    ("config sync_batchnorm", lambda: validate_config(config(sync_batchnorm=1)), ValueError,
     "sync_batchnorm must be True or False"),
    ("config max_nonfinite_steps", lambda: validate_config(config(max_nonfinite_steps=0)), ValueError,
     "max_nonfinite_steps must be a positive integer"),
    ("config lr nan", lambda: validate_config(config(lr=math.nan)), ValueError, "lr must be a finite number"),
    ("config step_mode", lambda: validate_config(config(step_mode="turbo")), ValueError, "step_mode must be one of"),
    ("config batch_size", lambda: validate_config(config(batch_size=2.5)), ValueError,
     "batch_size must be a positive integer"),
]


@pytest.mark.parametrize("case, call, error, text", CASES, ids=[c[0] for c in CASES])
def test_malformed_input_is_refused_in_one_line(case, call, error, text):
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    assert text in message and "\n" not in message, message


def test_valid_inputs_pass_the_same_checks():
    # the refusals above are not a step that refuses everything
    assert math.isfinite(ign_step()(x(), x())["loss"])
    assert math.isfinite(naign_step()(x(), x(8))["loss"])
    assert math.isfinite(naign_step(sample_noise=lambda n: torch.randn(n, DIM))(x())["loss"])
    InMemoryLoader((x(10), torch.arange(10)), 2).next_batch()
    check_data("moons", x(10))
    validate_config(config())
