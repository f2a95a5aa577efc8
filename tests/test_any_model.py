"""Your model, your data (issue 15): a module defined here, not in ign_fast, goes through train -> resume ->
sample -> project -> export in every format -> load with torch alone; the CLI builds a model from MODULE:ATTR
on PYTHONPATH; images stream from a folder into the U-Net; EMA weights are what a run is used with; a
checkpoint naming code to run is refused and nothing runs."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import ign_fast
from ign_fast import checkpoint as ckpt
from ign_fast.cli import main
from ign_fast.trainer import TrainConfig, Trainer


class TinyDenoiser(torch.nn.Module):
    """A user's own image-to-image model: a residual conv net with a Python-side check in forward (which
    TorchScript cannot compile, so its export takes the tracing route)."""

    def __init__(self, width=8):
        super().__init__()
        self.settings = {"width": width, "kind": "tiny"}  # a mixed-type dict: not scriptable
        self.body = torch.nn.Sequential(torch.nn.Conv2d(1, width, 3, padding=1), torch.nn.GroupNorm(2, width),
                                        torch.nn.SiLU(), torch.nn.Conv2d(width, 1, 3, padding=1))

    def forward(self, x):
        if x.dim() != 4:
            raise ValueError(f"TinyDenoiser wants [B, 1, H, W], got {list(x.shape)}")
        return torch.tanh(x + self.body(x))


def digits(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 12, 12, generator=g) * 2 - 1).clamp(-1, 1)


def config(out, steps, **kw):
    values = dict(objective="naign", batch_size=8, steps=steps, checkpoint_every=3, log_every=1,
                  sample_every=1000, progress=False, out=str(out), candidates=2)
    return TrainConfig(**{**values, **kw})


def test_a_module_of_your_own_trains_resumes_samples_projects_and_exports(tmp_path):
    run = tmp_path / "run"
    data = digits()
    trainer = Trainer(config(run, 6), model=TinyDenoiser(8), model_kwargs={"width": 8}, data=data)
    trainer.fit()
    meta = ckpt.load_checkpoint(str(run))["meta"]
    assert meta["model_config"] == {"target": "test_any_model:TinyDenoiser", "kwargs": {"width": 8}}
    resumed = Trainer(config(run, 9), resume=True, model=TinyDenoiser(8), model_kwargs={"width": 8}, data=data)
    assert resumed.step == 6
    resumed.fit()

    projector = ign_fast.Projector.load(str(run))  # rebuilt by its import path, no pickle; the EMA weights
    assert isinstance(projector.model, TinyDenoiser)
    for name, value in projector.model.state_dict().items():
        assert torch.equal(value, resumed.ema.state_dict()[name]), name
    samples = projector.generate(5, seed=3)
    assert samples.shape == (5, 1, 12, 12)
    projected = projector.project(data[:4])
    with torch.no_grad(), resumed.ema.applied(resumed.model):
        torch.testing.assert_close(projected, resumed.model.eval()(data[:4]), rtol=0, atol=1e-6)

    x = torch.rand(3, 1, 12, 12) * 2 - 1
    expected = projector.project(x, steps=2)
    paths = {}
    for fmt, name in (("torchscript", "f.pt"), ("export", "f.pt2")):
        paths[fmt] = ign_fast.export_projector(projector.model, str(tmp_path / name), steps=2, format=fmt,
                                               prior=projector.prior)[0]
    torch.save(x, tmp_path / "x.pt")
    loader = textwrap.dedent(f"""
        import sys
        sys.path.append({os.path.dirname(os.path.dirname(torch.__file__))!r})
        import torch
        x = torch.load("x.pt")
        ts = torch.jit.load("f.pt")
        pt2 = torch.export.load("f.pt2").module()
        torch.save({{"ts": ts(x), "ts3": ts(torch.cat([x, x])), "pt2": pt2(x)}}, "out.pt")
        assert not any(n == "ign_fast" or n.startswith("ign_fast.") for n in sys.modules)
    """)
    result = subprocess.run([sys.executable, "-I", "-S", "-c", loader], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = torch.load(tmp_path / "out.pt")
    torch.testing.assert_close(out["ts"], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(out["ts3"][:3], expected, rtol=0, atol=1e-5)  # the traced batch stays free
    torch.testing.assert_close(out["pt2"], expected, rtol=0, atol=1e-5)


def test_onnx_export_of_your_own_module_runs_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="needs the optional onnx extra (pip install '.[onnx]')")
    pytest.importorskip("onnxscript", reason="needs the optional onnx extra (pip install '.[onnx]')")
    model = TinyDenoiser(8)
    path = ign_fast.export_projector(model, str(tmp_path / "f.onnx"), steps=2, format="onnx",
                                     input_shape=(1, 12, 12))[0]
    x = torch.rand(5, 1, 12, 12) * 2 - 1
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        expected = model(model(x))
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5, rtol=0)


def test_a_model_without_its_kwargs_loads_with_the_instance(tmp_path):
    run = tmp_path / "run"
    Trainer(config(run, 3), model=TinyDenoiser(4), data=digits()).fit()
    with pytest.raises(ckpt.CheckpointError, match="without model_kwargs.*model=instance"):
        ign_fast.Projector.load(str(run))
    projector = ign_fast.Projector.load(str(run), model=TinyDenoiser(4))
    assert projector.generate(2).shape == (2, 1, 12, 12)


def test_a_model_that_changes_the_shape_is_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"model must return its input's shape: for data samples of shape "
                                         r"\(1, 12, 12\) it returned \(2, 1, 6, 6\)"):
        Trainer(config(tmp_path / "r", 2), model=torch.nn.AvgPool2d(2), data=digits())
    with pytest.raises(TypeError, match="data must be a tensor"):
        Trainer(config(tmp_path / "r", 2), data=[1, 2, 3])
    # a module whose own forward fails on the data's shape: one line naming the shape, not a traceback
    with pytest.raises(ValueError, match=r"model cannot run on data samples of shape \(1, 12, 12\): .*channels"):
        Trainer(config(tmp_path / "r", 2), model=torch.nn.Conv2d(3, 1, 3, padding=1), data=digits())


def test_cli_conditional_run_with_a_module_built_for_the_image_channels_only_is_one_line(tmp_path, capsys,
                                                                                      monkeypatch):
    """--conditional feeds C + K channels; a user's module built for C gets one line saying so (exit 2)."""
    from ign_fast.cli import main

    (tmp_path / "plain_nets.py").write_text("import torch\n\nclass OneChannel(torch.nn.Conv2d):\n"
                                            "    def __init__(self):\n        super().__init__(1, 1, 3, padding=1)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["train", "--model", "plain_nets:OneChannel", "--conditional", "--steps", "1", "--no-progress",
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--conditional inputs (1 image + 10 label channels" in err
    assert "11 input channels" in err


USER_MODULE = '''
import torch

class Net(torch.nn.Module):
    def __init__(self, dim=2, width=16):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(dim, width), torch.nn.SiLU(), torch.nn.Linear(width, dim))

    def forward(self, x):
        return x + self.net(x)

def make(width=16):
    return Net(2, width)
'''


@pytest.fixture
def user_module_on_path(tmp_path, monkeypatch):
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "user_nets.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    sys.modules.pop("user_nets", None)


def test_cli_trains_samples_and_exports_a_model_named_by_import_path(tmp_path, user_module_on_path, capsys):
    run = str(tmp_path / "run")
    base = ["train", "--data", "8gaussians", "--batch-size", "16", "--steps", "4", "--no-progress",
            "--candidates", "2", "--out", run]
    assert main(base + ["--model", "user_nets:Net", "--model-kwargs", '{"width": 8}']) == 0
    meta = ckpt.load_checkpoint(run)["meta"]
    assert meta["model_config"] == {"target": "user_nets:Net", "kwargs": {"width": 8}}
    assert main(["sample", run, "--n", "4"]) == 0
    assert main(["export", run, "--format", "torchscript", "--out", str(tmp_path / "f.pt")]) == 0
    f = torch.jit.load(str(tmp_path / "f.pt"))
    assert f(torch.zeros(3, 2)).shape == (3, 2)
    capsys.readouterr()
    # a factory needs trust; the refusal is one line and exit 2
    other = str(tmp_path / "run2")
    assert main(base[:-1] + [other, "--model", "user_nets:make"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--trust-model-code" in err
    assert main(base[:-1] + [other, "--model", "user_nets:make", "--trust-model-code"]) == 0
    assert main(["sample", other, "--n", "4"]) == 2  # rebuilding calls the factory again: trust again
    assert "--trust-model-code" in capsys.readouterr().err
    assert main(["sample", other, "--n", "4", "--trust-model-code"]) == 0


@pytest.mark.parametrize("bad, message", [
    (["--model", "user_nets:Nope"], "has no attribute 'Nope'"),
    (["--model", "no_such_pkg_xyz:Net"], "cannot import 'no_such_pkg_xyz'"),
    (["--model", "not-a-path"], "MODULE:ATTR"),
    (["--model", "user_nets:Net", "--model-kwargs", "{width: 8}"], "--model-kwargs must be a JSON object"),
    (["--model", "user_nets:Net", "--model-kwargs", '{"depth": 3}'], "does not take kwargs"),
])
def test_cli_model_errors_are_one_line(tmp_path, user_module_on_path, capsys, bad, message):
    argv = ["train", "--data", "8gaussians", "--steps", "2", "--no-progress", "--out", str(tmp_path / "r")] + bad
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_a_checkpoint_naming_a_command_is_refused_and_nothing_runs(tmp_path, capsys):
    run = tmp_path / "run"
    Trainer(config(run, 3), model=TinyDenoiser(4), model_kwargs={"width": 4}, data=digits()).fit()
    folder = ckpt.resolve_checkpoint(str(run))
    meta_path = os.path.join(folder, "meta.json")
    meta = json.load(open(meta_path))
    marker = tmp_path / "pwned"
    for record in ({"target": "os:system", "kwargs": {"command": f"touch {marker}"}},
                   {"target": "subprocess:run", "kwargs": {"args": ["touch", str(marker)]}},
                   {"target": "builtins:eval", "kwargs": {"source": f"open({str(marker)!r}, 'w')"}}):
        meta["model_config"] = record
        json.dump(meta, open(meta_path, "w"))
        for trust in ([], ["--trust-model-code"]):
            assert main(["sample", str(run)] + trust) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and "standard library" in err, err
    assert not marker.exists()


def write_images(root, n=10):
    rng = np.random.default_rng(0)
    root.mkdir()
    for i in range(n):
        w, h = [(70, 64), (64, 90), (80, 80)][i % 3]
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(root / f"face{i:02d}.png")
    (root / "broken.png").write_bytes(b"not an image")
    return root


def test_unet_trains_on_images_streamed_from_a_folder_end_to_end(tmp_path, capsys):
    images = write_images(tmp_path / "faces")
    run = str(tmp_path / "run")
    argv = ["train", "--data", "images", "--data-root", str(images), "--image-size", "64", "--model", "unet",
            "--width", "8", "--model-kwargs", '{"depth": 3}', "--steps", "3", "--batch-size", "4", "--no-progress",
            "--candidates", "2", "--num-workers", "2", "--ema-decay", "0.9", "--out", run]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "skipped 1 unreadable files" in captured.err and "broken.png" in captured.err
    assert os.path.isfile(os.path.join(run, "samples.png"))
    state = ckpt.load_checkpoint(run)
    assert state["meta"]["model_config"]["name"] == "unet" and state["ema"] is not None
    projector = ign_fast.Projector.load(run)
    for name, value in projector.model.state_dict().items():  # the EMA weights, not the trained ones
        assert torch.equal(value, state["ema"][name]), name
    trained = ign_fast.Projector.load(run, ema=False)
    assert any(not torch.equal(v, state["ema"][k]) for k, v in trained.model.state_dict().items())
    assert main(["export", run, "--format", "export", "--out", str(tmp_path / "u.pt2")]) == 0


def test_streamed_training_resumes_exactly_mid_epoch(tmp_path):
    images = write_images(tmp_path / "faces", n=12)
    common = dict(data="images", data_root=str(images), image_size=32, model="unet", width=8, batch_size=4,
                  num_workers=0)
    straight = Trainer(config(tmp_path / "a", 6, **common))  # 3 batches per epoch
    straight.fit()
    first = Trainer(config(tmp_path / "b", 4, **common))
    first.fit()
    second = Trainer(config(tmp_path / "b", 6, **common), resume=True)
    assert second.loader.state_dict() == {"epoch": 1, "position": 1}  # step 4: one batch into the second epoch
    second.fit()
    for a, b in zip(straight.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)
