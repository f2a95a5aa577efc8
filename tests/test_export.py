"""Exported projectors: TorchScript, torch.export and ONNX files equal the eager model (batch- and group-norm,
gaussian, fourier and mixture priors), keep a free batch size, load in a process where ign_fast cannot be imported, and
broken files are refused with one line. The C++ example is checked against Python when a compiler is present."""
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from ign_fast import Projector, export_projector
from ign_fast.cli import main
from ign_fast.export import ExportedPrior, generate_path, load_torchscript
from ign_fast.inference import apply_f
from ign_fast.models import build_model
from ign_fast.noise import FourierPrior, GaussianPrior, MixturePrior

HAS_ORT = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnxscript") is not None
BATCHES = (1, 3, 17)
ATOL = 1e-5
SHAPE = (1, 28, 28)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_prior(kind):
    if kind == "gaussian":
        return GaussianPrior(SHAPE)
    data = torch.rand(64, *SHAPE, generator=torch.Generator().manual_seed(5)) * 2 - 1
    return FourierPrior.fit(data) if kind == "fourier" else MixturePrior.fit(data, components=5, rank=3)


def make_model(norm, seed=0):
    torch.manual_seed(seed)
    model = build_model("dcgan28", latent_dim=8, width=8, norm=norm)
    if norm == "batch":
        # Running statistics far from the batch's, so exporting eval-mode BatchNorm by mistake cannot pass.
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.fill_(0.3)
                m.running_var.fill_(4.0)
    return model.eval()


def eager_generate(model, prior, n, seed, steps):
    return apply_f(model, prior.sample(n, generator=torch.Generator().manual_seed(seed)), steps)


def seeded_eps(noise_shape, n, seed):
    # The draw prior.sample makes from the same generator: eps of the prior's noise shape.
    return torch.randn((n, *noise_shape), generator=torch.Generator().manual_seed(seed))


CASES = [("batch", "fourier"), ("group", "gaussian"), ("group", "mixture"), ("batch", "gaussian"),
         ("group", "fourier")]


@pytest.fixture(scope="module")
def batch_fourier(tmp_path_factory):
    """A batch-norm model with a fourier prior exported once as TorchScript and torch.export (steps 2), shared
    by the tests that load those files elsewhere (torch-only process, C++)."""
    folder = tmp_path_factory.mktemp("batch_fourier")
    model, prior = make_model("batch"), make_prior("fourier")
    export_projector(model, str(folder / "f.pt"), steps=2, prior=prior)
    export_projector(model, str(folder / "f.pt2"), steps=2, format="export", prior=prior)
    return folder, model, prior


@pytest.mark.parametrize("norm, prior_kind", CASES)
def test_torchscript_matches_eager_with_free_batch_and_steps(tmp_path, norm, prior_kind):
    model, prior = make_model(norm), make_prior(prior_kind)
    path = str(tmp_path / "f.pt")
    assert export_projector(model, path, steps=2, prior=prior) == [path]
    scripted, metadata = load_torchscript(path)
    assert metadata["steps"] == 2 and metadata["prior"] == prior_kind
    assert metadata["normalization"] == ("batch-statistics" if norm == "batch" else "eval")
    for batch in BATCHES:
        x = torch.randn(batch, *SHAPE)
        torch.testing.assert_close(scripted(x), apply_f(model, x, 2), atol=ATOL, rtol=0)
        torch.testing.assert_close(scripted(x, 3), apply_f(model, x, 3), atol=ATOL, rtol=0)
    generated = scripted.generate(5, 11)
    assert generated.shape == (5, *SHAPE)
    torch.testing.assert_close(generated, eager_generate(model, prior, 5, 11, 2), atol=ATOL, rtol=0)
    assert torch.equal(generated, scripted.generate(5, 11))
    assert not torch.allclose(generated, scripted.generate(5, 12))
    assert scripted.generate(0).shape == (0, *SHAPE)
    with pytest.raises(Exception, match=r"x must have shape \[batch, 1, 28, 28\]"):
        scripted(torch.randn(2, 3, 28, 28))


def test_batch_norm_is_exported_with_batch_statistics(tmp_path):
    model = make_model("batch")
    running = {k: v.clone() for k, v in model.named_buffers()}
    export_projector(model, str(tmp_path / "f.pt"))
    scripted, _ = load_torchscript(str(tmp_path / "f.pt"))
    x = torch.randn(4, *SHAPE)
    exported = scripted(x)
    # Exporting and running the export leave the model's running statistics alone, and the file holds none.
    assert all(torch.equal(v, running[k]) for k, v in model.named_buffers())
    assert not any("running" in name for name, _ in scripted.named_buffers())
    with torch.no_grad():
        eval_mode = model.eval()(x)
        train_mode = model.train()(x)  # batch statistics (this call also moves the running stats)
    torch.testing.assert_close(exported, train_mode, atol=ATOL, rtol=0)
    assert (exported - eval_mode).abs().max() > 1e-2


@pytest.mark.parametrize("height, width", [(28, 28), (7, 9), (6, 5)])
def test_exported_fourier_prior_equals_irfft2_sampling(height, width):
    data = torch.randn(40, 2, height, width, generator=torch.Generator().manual_seed(1))
    prior = FourierPrior.fit(data)
    baked = ExportedPrior(prior)
    eps = seeded_eps(baked.noise_shape, 6, 3)
    torch.testing.assert_close(baked(eps), prior.sample(6, generator=torch.Generator().manual_seed(3)),
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("norm, prior_kind", CASES[:3])
def test_torch_export_matches_eager_with_dynamic_batch(tmp_path, batch_fourier, norm, prior_kind):
    if (norm, prior_kind) == ("batch", "fourier"):
        folder, model, prior = batch_fourier
        path = str(folder / "f.pt2")
        assert os.path.isfile(generate_path(path))
    else:
        model, prior = make_model(norm), make_prior(prior_kind)
        path = str(tmp_path / "f.pt2")
        assert export_projector(model, path, steps=2, format="export", prior=prior) == [path, generate_path(path)]
    forward = torch.export.load(path).module()
    generate = torch.export.load(generate_path(path)).module()
    noise_shape = ExportedPrior(prior).noise_shape
    for batch in BATCHES:
        x = torch.randn(batch, *SHAPE)
        torch.testing.assert_close(forward(x), apply_f(model, x, 2), atol=ATOL, rtol=0)
        torch.testing.assert_close(generate(seeded_eps(noise_shape, batch, 4)),
                                   eager_generate(model, prior, batch, 4, 2), atol=ATOL, rtol=0)


@pytest.mark.skipif(not HAS_ORT, reason="onnxruntime and onnxscript not installed (optional)")
@pytest.mark.parametrize("prior_kind", ["fourier", "mixture"])
def test_onnx_matches_eager_with_dynamic_batch(tmp_path, prior_kind):
    import onnxruntime

    model, prior = make_model("batch"), make_prior(prior_kind)
    path = str(tmp_path / "f.onnx")
    assert export_projector(model, path, steps=2, format="onnx", prior=prior) == [path, generate_path(path)]
    forward = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    generate = onnxruntime.InferenceSession(generate_path(path), providers=["CPUExecutionProvider"])
    noise_shape = ExportedPrior(prior).noise_shape
    for batch in BATCHES:
        x = torch.randn(batch, *SHAPE)
        got = torch.from_numpy(forward.run(None, {"x": x.numpy()})[0])
        torch.testing.assert_close(got, apply_f(model, x, 2), atol=ATOL, rtol=0)
        eps = seeded_eps(noise_shape, batch, 4)
        got = torch.from_numpy(generate.run(None, {"eps": eps.numpy()})[0])
        torch.testing.assert_close(got, eager_generate(model, prior, batch, 4, 2), atol=ATOL, rtol=0)


TORCH_ONLY_LOADER = textwrap.dedent("""
    import sys
    try:
        import ign_fast
    except ImportError:
        pass
    else:
        raise SystemExit("ign_fast is importable here: the test would prove nothing")
    import torch
    inputs = torch.load("inputs.pt")
    out = {}
    scripted = torch.jit.load("f.pt")
    out["ts"] = scripted(inputs["x"])
    out["ts_steps3"] = scripted(inputs["x"], 3)
    out["ts_generate"] = scripted.generate(5, 11)
    out["pt2"] = torch.export.load("f.pt2").module()(inputs["x"])
    out["pt2_generate"] = torch.export.load("f.generate.pt2").module()(inputs["eps"])
    assert not any(name == "ign_fast" or name.startswith("ign_fast.") for name in sys.modules)
    torch.save(out, "outputs.pt")
""")


def test_exported_files_run_where_only_torch_is_installed(batch_fourier):
    # (ONNX files need onnxruntime, not torch, to run: their own test covers them.)
    tmp_path, model, prior = batch_fourier
    x = torch.randn(3, *SHAPE)
    eps = seeded_eps(ExportedPrior(prior).noise_shape, 4, 9)
    torch.save({"x": x, "eps": eps}, tmp_path / "inputs.pt")
    (tmp_path / "loader.py").write_text(TORCH_ONLY_LOADER)
    # -I: no cwd, user site or PYTHON* variables on the path; -S: no site-packages .pth files, which is where an
    # editable install of ign_fast hooks itself in. Only the folder holding torch (and its dependencies) is added.
    site_packages = os.path.dirname(os.path.dirname(torch.__file__))
    bootstrap = f"import sys; sys.path.append({site_packages!r}); exec(open('loader.py').read())"
    result = subprocess.run([sys.executable, "-I", "-S", "-c", bootstrap], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = torch.load(tmp_path / "outputs.pt")
    for key in ("ts", "pt2"):
        torch.testing.assert_close(out[key], apply_f(model, x, 2), atol=ATOL, rtol=0)
    torch.testing.assert_close(out["ts_steps3"], apply_f(model, x, 3), atol=ATOL, rtol=0)
    torch.testing.assert_close(out["ts_generate"], eager_generate(model, prior, 5, 11, 2), atol=ATOL, rtol=0)
    torch.testing.assert_close(out["pt2_generate"], eager_generate(model, prior, 4, 9, 2), atol=ATOL, rtol=0)


def one_line_value_error(call, *fragments):
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    for fragment in fragments:
        assert fragment in message, message


def test_broken_export_files_are_refused_with_one_line(tmp_path):
    path = tmp_path / "f.pt"
    export_projector(make_model("group"), str(path), prior=make_prior("gaussian"))
    data = path.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a zip file" * 10)
    (tmp_path / "empty.pt").write_bytes(b"")
    for name in ("truncated.pt", "garbage.pt", "empty.pt"):
        one_line_value_error(lambda: Projector.load(str(tmp_path / name)), name, "corrupt")
    foreign = torch.jit.script(torch.nn.Linear(2, 2))
    foreign.save(str(tmp_path / "foreign.pt"))
    one_line_value_error(lambda: Projector.load(str(tmp_path / "foreign.pt")), "not an ign_fast projector")
    one_line_value_error(lambda: Projector.load(str(tmp_path / "missing.pt")), "does not exist")
    (tmp_path / "f.pt2").write_bytes(b"x")
    one_line_value_error(lambda: Projector.load(str(tmp_path / "f.pt2")), "torch.export.load")


def test_export_arguments_are_checked():
    model = make_model("group")
    one_line_value_error(lambda: export_projector(model, "unused.pt", format="tflite"), "format must be one of")
    one_line_value_error(lambda: export_projector(model, "unused.pt", steps=0), "steps must be")
    one_line_value_error(lambda: export_projector(model, "unused.pt", format="export"), "must end in .pt2")
    one_line_value_error(lambda: export_projector(model, "unused.pt", format="onnx"), "must end in .onnx")
    one_line_value_error(lambda: export_projector(model, "unused.pt", prior=GaussianPrior((3, 28, 28))),
                         "prior shape")
    one_line_value_error(lambda: export_projector(model, "unused.pt", prior=FourierPrior(SHAPE)), "unfitted")
    assert not os.path.exists("unused.pt")


TINY = ["--latent-dim", "8", "--width", "8", "--batch-size", "16", "--no-progress"]


def test_cli_export_and_its_errors(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["train", *TINY, "--out", run, "--steps", "2", "--prior", "fourier", "--norm", "batch"]) == 0
    out = str(tmp_path / "f.pt")
    assert main(["export", run, "--steps", "2", "--out", out]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    eager, exported = Projector.load(run), Projector.load(out)
    torch.testing.assert_close(exported.generate(6, steps=2, seed=3), eager.generate(6, steps=2, seed=3),
                               atol=ATOL, rtol=0)
    assert main(["export", run, "--out", str(tmp_path / "g.pt"), "--no-prior"]) == 0
    projector_only = Projector.load(str(tmp_path / "g.pt"))
    torch.testing.assert_close(projector_only.project(eager.noise(3, seed=1)), eager.project(eager.noise(3, seed=1)),
                               atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="no prior"):
        projector_only.generate(2)
    capsys.readouterr()
    for argv, message in [
        (["export", run, "--format", "keras", "--out", out], "format must be one of"),
        (["export", run, "--steps", "0", "--out", out], "steps must be a positive integer"),
        (["export", out, "--out", str(tmp_path / "h.pt")], "no checkpoint found"),
        (["export", str(tmp_path / "nowhere"), "--out", out], "does not exist"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


def _cpp_build_dir():
    return os.path.join(REPO, "build", "cpp-example")


def write_f32(tensor, path):
    values = tensor.contiguous().float()
    with open(path, "wb") as f:
        f.write(f"IGNF32 {values.dim()} {' '.join(map(str, values.shape))}\n".encode())
        f.write(values.numpy().astype("<f4").tobytes())


def read_f32(path):
    import numpy as np

    with open(path, "rb") as f:
        header = f.readline().decode().split()
        assert header[0] == "IGNF32"
        shape = [int(d) for d in header[2:]]
        return torch.from_numpy(np.frombuffer(f.read(), dtype="<f4").copy()).view(shape)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("c++") is None, reason="needs cmake and c++")
def test_cpp_example_matches_python(tmp_path, batch_fourier):
    # Built once into build/cpp-example (kept between runs: the first build takes about a minute here).
    build = _cpp_build_dir()
    prefix = torch.utils.cmake_prefix_path
    steps = [["cmake", "-S", os.path.join(REPO, "examples", "cpp"), "-B", build, f"-DCMAKE_PREFIX_PATH={prefix}",
              "-DCMAKE_BUILD_TYPE=Release"], ["cmake", "--build", build, "-j2"]]
    for command in steps:
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    binary = os.path.join(build, "ign_project")
    folder, model, prior = batch_fourier
    shutil.copy(folder / "f.pt", tmp_path / "f.pt")
    x = torch.rand(3, *SHAPE) * 2 - 1
    write_f32(x, tmp_path / "in.f32")
    commands = [[binary, "f.pt", "project", "in.f32", "projected.f32"],
                [binary, "f.pt", "project", "in.f32", "projected3.f32", "3"],
                [binary, "f.pt", "generate", "5", "11", "generated.f32"],
                [binary, "f.pt", "generate", "4", "2", "grid.pgm"]]
    # the C++ process runs with this process's thread count, so its reductions split the same way
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    for command in commands:
        result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
        assert result.returncode == 0, result.stderr
    # float32 through two applications of a BatchNorm model in another process: a full-suite run once differed
    # by 1.5e-5 in 50 of 3,920 generated pixels (rounding); a wrong program differs by 1e-1
    cpp_atol = 5e-5
    torch.testing.assert_close(read_f32(tmp_path / "projected.f32"), apply_f(model, x, 2), atol=cpp_atol, rtol=0)
    torch.testing.assert_close(read_f32(tmp_path / "projected3.f32"), apply_f(model, x, 3), atol=cpp_atol, rtol=0)
    torch.testing.assert_close(read_f32(tmp_path / "generated.f32"), eager_generate(model, prior, 5, 11, 2),
                               atol=cpp_atol, rtol=0)
    grid = (tmp_path / "grid.pgm").read_bytes()
    assert grid.startswith(b"P5\n112 28\n255\n") and len(grid) == len(b"P5\n112 28\n255\n") + 112 * 28
    result = subprocess.run([binary, "f.pt", "project", "missing.pgm", "o.pgm"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1 and "cannot open missing.pgm" in result.stderr


def test_onnx_without_its_packages_is_a_one_line_import_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # what `import onnxscript` meets where it is not installed
    with pytest.raises(ImportError, match="pip install onnx onnxscript onnxruntime") as info:
        export_projector(make_model("group"), str(tmp_path / "f.onnx"), format="onnx")
    assert len(str(info.value).splitlines()) == 1
    assert not os.path.exists(tmp_path / "f.onnx")


@pytest.mark.skipif(importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxscript") is None,
                    reason="onnx and onnxscript not installed (optional)")
def test_cli_onnx_export_prints_no_warnings_the_user_cannot_act_on(tmp_path):
    """Issue 12: ten lines on stderr ("torchvision is not installed" x8, a FutureWarning from torch's pytree)."""
    run = str(tmp_path / "run")
    assert main(["train", *TINY, "--out", run, "--steps", "1"]) == 0
    out = subprocess.run([sys.executable, "-m", "ign_fast", "export", run, "--format", "onnx", "--out",
                          str(tmp_path / "f.onnx")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stderr == "", out.stderr
    assert os.path.isfile(tmp_path / "f.onnx")
