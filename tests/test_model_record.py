"""Model records: a model rebuilt by import path and JSON kwargs, never a pickle; code named by a checkpoint
runs only when it is an nn.Module class, or with trust_model_code; the standard library is refused."""
import sys
import textwrap

import pytest
import torch

from ign_fast.model_record import ModelRecordError, build, parse_kwargs_json, rebuild, record_for
from ign_fast.models import DCGAN28


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module of the user's own on sys.path, with a model class, a factory, and a marker of side effects."""
    (tmp_path / "my_nets.py").write_text(textwrap.dedent('''
        import torch
        CALLS = []

        class Denoiser(torch.nn.Module):
            def __init__(self, dim=4, scale=0.5):
                super().__init__()
                self.linear = torch.nn.Linear(dim, dim)
                self.scale = scale

            def forward(self, x):
                return x + self.scale * self.linear(x)

        def make_denoiser(dim=4):
            CALLS.append(dim)
            return Denoiser(dim)

        def not_a_model():
            CALLS.append("ran")
            return 42
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield __import__("my_nets")
    sys.modules.pop("my_nets", None)


def test_a_user_class_round_trips_through_its_record(user_module):
    model = user_module.Denoiser(dim=6, scale=0.25)
    record = record_for(model, kwargs={"dim": 6, "scale": 0.25})
    assert record == {"target": "my_nets:Denoiser", "kwargs": {"dim": 6, "scale": 0.25}}
    again = rebuild(record)
    assert isinstance(again, user_module.Denoiser) and again.scale == 0.25 and again.linear.in_features == 6


def test_built_in_models_keep_their_config_record():
    model = DCGAN28(latent_dim=8, width=8, norm="group")
    record = record_for(model)
    assert record == model.config
    assert isinstance(rebuild(record), DCGAN28)
    assert isinstance(build("dcgan28", {"latent_dim": 8, "width": 8}), DCGAN28)


def test_a_factory_needs_trust(user_module):
    record = {"target": "my_nets:make_denoiser", "kwargs": {"dim": 3}}
    with pytest.raises(ModelRecordError, match="not an nn.Module subclass.*--trust-model-code"):
        rebuild(record)
    assert user_module.CALLS == []  # refused before the call
    model = rebuild(record, trust_model_code=True)
    assert user_module.CALLS == [3] and model.linear.in_features == 3


def test_a_trusted_factory_must_return_a_module(user_module):
    with pytest.raises(ModelRecordError, match="returned a int, not an nn.Module"):
        rebuild({"target": "my_nets:not_a_model", "kwargs": {}}, trust_model_code=True)


@pytest.mark.parametrize("target", ["subprocess:run", "os:system", "builtins:eval", "shutil:rmtree",
                                    "importlib:import_module"])
@pytest.mark.parametrize("trust", [False, True])
def test_the_standard_library_is_refused_and_nothing_runs(tmp_path, target, trust):
    marker = tmp_path / "ran"
    kwargs = {"args": ["touch", str(marker)]} if target == "subprocess:run" else {"command": f"touch {marker}"}
    with pytest.raises(ModelRecordError, match="names Python's standard library, which holds no model; refused"):
        rebuild({"target": target, "kwargs": kwargs}, trust_model_code=trust)
    assert not marker.exists()


@pytest.mark.parametrize("record, message", [
    ({"target": "no_such_module_xyz:Net", "kwargs": {}}, "cannot import 'no_such_module_xyz'.*PYTHONPATH"),
    ({"target": "my_nets:Missing", "kwargs": {}}, "module 'my_nets' has no attribute 'Missing'"),
    ({"target": "my_nets:CALLS", "kwargs": {}}, "is not callable"),
    ({"target": "my_nets:Denoiser", "kwargs": {"width": 3}}, "does not take kwargs"),
    ({"target": "not a path", "kwargs": {}}, "MODULE:ATTR"),
    ({"target": None, "kwargs": {}}, "defined in __main__ or inside a function.*model=instance"),
    ({"weights": 1}, "must have 'target' or a built-in 'name'"),
])
def test_bad_records_are_one_line(user_module, record, message):
    with pytest.raises(ModelRecordError, match=message) as info:
        rebuild(record)
    assert "\n" not in str(info.value)


def test_kwargs_must_be_a_json_object():
    assert parse_kwargs_json('{"width": 64}') == {"width": 64}
    with pytest.raises(ModelRecordError, match="--model-kwargs must be a JSON object"):
        parse_kwargs_json("{width: 64}")
    with pytest.raises(ModelRecordError, match="must be a JSON object, got list"):
        parse_kwargs_json("[1, 2]")


def test_a_class_defined_in_a_function_records_no_target():
    class Local(torch.nn.Module):
        def forward(self, x):
            return x

    assert record_for(Local()) == {"target": None, "kwargs": None}
