"""Projector on tiny trained runs: each method against apply_f computed by hand, the same answers from the run
folder, a checkpoint dict and its TorchScript export, grayscale inputs for colour models, and argument errors."""
import os

import pytest
import torch

from ign_fast import Projector, export_projector
from ign_fast import checkpoint as ckpt
from ign_fast.cli import main
from ign_fast.images import load_png
from ign_fast.inference import apply_f, load_trained, slerp
from ign_fast.models import build_model
from ign_fast.noise import GaussianPrior, MixturePrior

TINY = ["--latent-dim", "8", "--width", "8", "--batch-size", "16", "--no-progress"]
ATOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two 2-step runs: group norm with a gaussian prior, batch norm with a fourier prior."""
    root = tmp_path_factory.mktemp("projector_runs")
    made = {}
    for norm, prior in (("group", "gaussian"), ("batch", "fourier")):
        run = str(root / f"{norm}-{prior}")
        assert main(["train", *TINY, "--out", run, "--steps", "2", "--norm", norm, "--prior", prior]) == 0
        export_path = str(root / f"{norm}-{prior}.pt")
        model, prior_module, _ = load_trained(run)
        export_projector(model, export_path, prior=prior_module)
        made[norm] = (run, export_path)
    return made


def test_generate_shape_seed_and_steps(runs):
    run, _ = runs["group"]
    projector = Projector.load(run)
    model, prior, _ = load_trained(run)
    samples = projector.generate(7, seed=3)
    assert samples.shape == (7, 1, 28, 28) and projector.prior_kind == "gaussian"
    z = prior.sample(7, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(samples, apply_f(model, z, 1))
    assert torch.equal(samples, projector.generate(7, seed=3))
    assert not torch.equal(samples, projector.generate(7, seed=4))
    torch.testing.assert_close(projector.generate(7, steps=2, seed=3), apply_f(model, samples, 1))
    torch.testing.assert_close(projector.noise(7, seed=3), z)


def test_set_prior_generates_from_the_prior_given(runs):
    """A run trained without --sample-prior, sampled from a mixture fitted to data afterwards."""
    run, export_path = runs["group"]
    projector = Projector.load(run)
    model, gaussian, _ = load_trained(run)
    data = torch.rand(40, 1, 28, 28, generator=torch.Generator().manual_seed(2)) * 2 - 1
    mixture = MixturePrior.fit(data, components=3, rank=2)
    assert projector.set_prior(mixture) is projector and projector.prior_kind == "mixture"
    z = mixture.sample(6, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(projector.noise(6, seed=9), z)
    torch.testing.assert_close(projector.generate(6, seed=9), apply_f(model, z, 1))
    assert not torch.allclose(projector.generate(6, seed=9), Projector.load(run).generate(6, seed=9))
    with pytest.raises(ValueError, match=r"input shape \[1, 28, 28\], got \[2\]"):
        projector.set_prior(GaussianPrior((2,)))
    with pytest.raises(TypeError, match="prior must be an ign_fast.noise prior"):
        projector.set_prior(torch.randn)
    with pytest.raises(ValueError, match="exported file carries its prior baked in"):
        Projector.load(export_path).set_prior(gaussian)


@pytest.mark.parametrize("norm", ["group", "batch"])
def test_project_and_distance(runs, norm):
    run, _ = runs[norm]
    projector = Projector.load(run)
    model, _, _ = load_trained(run)
    images = torch.rand(5, 1, 28, 28) * 2 - 1
    torch.testing.assert_close(projector.project(images), apply_f(model, images, 1))
    torch.testing.assert_close(projector.project(images, steps=3), apply_f(model, images, 3))
    if norm == "group":  # one unbatched image is one sample; with batch statistics it would be its own batch
        torch.testing.assert_close(projector.project(images[2]), apply_f(model, images, 1)[2:3])
    drift = projector.distance(images)
    expected = (apply_f(model, images, 1) - images).square().mean(dim=(1, 2, 3)).sqrt()
    assert drift.shape == (5,)
    torch.testing.assert_close(drift, expected)
    # Per-sample RMS: a sample's drift is ||f(y) - y|| / sqrt(784), not the batch's.
    manual = (apply_f(model, images, 1)[1] - images[1]).norm() / 28.0
    torch.testing.assert_close(drift[1], manual)


def test_distance_is_zero_on_fixed_points_and_grows_off_them(runs):
    run, _ = runs["group"]
    projector = Projector.load(run)
    y = projector.generate(4, steps=30, seed=0)  # iterating f approaches its fixed points
    on, off = projector.distance(y), projector.distance(y + 0.5 * torch.randn_like(y))
    assert (on < off).all(), (on, off)


def test_interpolate_endpoints_and_blends(runs):
    run, _ = runs["group"]
    projector = Projector.load(run)
    model, _, _ = load_trained(run)
    z = projector.noise(2, seed=1)
    path = projector.interpolate(z[0], z[1], 5)
    assert path.shape == (5, 1, 28, 28)
    torch.testing.assert_close(path[0], apply_f(model, z[:1], 1)[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(path[-1], apply_f(model, z[1:], 1)[0], atol=ATOL, rtol=0)
    blends = slerp(z[:1], z[1:], torch.linspace(0, 1, 5))[:, 0]
    torch.testing.assert_close(path, apply_f(model, blends, 1), atol=ATOL, rtol=0)


def test_slerp_keeps_the_norm_a_straight_line_loses():
    a, b = torch.randn(1, 500, generator=torch.Generator().manual_seed(0)).chunk(2, dim=1)
    b = b / b.norm() * a.norm()
    t = torch.linspace(0, 1, 7)
    arc = slerp(a, b, t)[:, 0]
    torch.testing.assert_close(arc[0], a[0])
    torch.testing.assert_close(arc[-1], b[0])
    torch.testing.assert_close(arc.norm(dim=1), a.norm().expand(7), rtol=1e-5, atol=1e-5)
    line = (1 - t[3]) * a + t[3] * b
    assert line.norm() < 0.8 * a.norm()  # two near-orthogonal draws: the midpoint shrinks to about 1/sqrt(2)
    torch.testing.assert_close(slerp(a, a, t)[:, 0], a.expand(7, -1))  # parallel: no division by sin(0)


def test_fourier_interpolation_is_linear(runs):
    run, _ = runs["batch"]
    projector = Projector.load(run)
    model, _, _ = load_trained(run)
    z = projector.noise(2, seed=5)
    t = torch.linspace(0, 1, 4).view(-1, 1, 1, 1)
    expected = apply_f(model, (1 - t) * z[:1] + t * z[1:], 1)
    torch.testing.assert_close(projector.interpolate(z[0], z[1], 4), expected, atol=ATOL, rtol=0)


def test_arithmetic(runs):
    run, _ = runs["group"]
    projector = Projector.load(run)
    model, _, _ = load_trained(run)
    z = projector.noise(3, seed=2)
    torch.testing.assert_close(projector.arithmetic(z[0], z[1], z[2]), apply_f(model, (z[0] - z[1] + z[2])[None], 1))
    # Batches broadcast against one sample: z_a - z_a + z_c is f(z_c).
    torch.testing.assert_close(projector.arithmetic(z, z, z[0]), apply_f(model, z[:1], 1).expand(3, -1, -1, -1))


@pytest.mark.parametrize("norm", ["group", "batch"])
def test_torchscript_and_checkpoint_dict_give_the_same_answers(runs, norm):
    run, export_path = runs[norm]
    eager = Projector.load(run)
    for other in (Projector.load(export_path), Projector.load(ckpt.load_checkpoint(run))):
        assert other.input_shape == eager.input_shape and other.prior_kind == eager.prior_kind
        torch.testing.assert_close(other.generate(6, steps=2, seed=8), eager.generate(6, steps=2, seed=8),
                                   atol=ATOL, rtol=0)
        images = torch.rand(4, 1, 28, 28) * 2 - 1
        torch.testing.assert_close(other.project(images, steps=2), eager.project(images, steps=2), atol=ATOL,
                                   rtol=0)
        torch.testing.assert_close(other.distance(images), eager.distance(images), atol=ATOL, rtol=0)
        z = eager.noise(2, seed=0)
        torch.testing.assert_close(other.interpolate(z[0], z[1], 3), eager.interpolate(z[0], z[1], 3), atol=ATOL,
                                   rtol=0)
        torch.testing.assert_close(other.arithmetic(z[0], z[1], z[0]), eager.arithmetic(z[0], z[1], z[0]),
                                   atol=ATOL, rtol=0)


def colour_run(tmp_path):
    """A checkpoint of a 3-channel DCGAN28 written with save_checkpoint (no colour data set is needed)."""
    model = build_model("dcgan28", in_channels=3, latent_dim=8, width=8, norm="group")
    prior = GaussianPrior((3, 28, 28))
    meta = {"model_config": model.config, "prior_config": prior.to_config()}
    run = str(tmp_path / "colour")
    ckpt.save_checkpoint(run, 1, model=model, optimizer=torch.optim.Adam(model.parameters()), prior=prior,
                         meta=meta, rng_states={"cpu": torch.get_rng_state()})
    return run, model


def test_grayscale_images_are_replicated_for_a_colour_model(tmp_path):
    run, model = colour_run(tmp_path)
    projector = Projector.load(run)
    gray = torch.rand(2, 1, 28, 28) * 2 - 1
    colour = gray.expand(-1, 3, -1, -1)
    torch.testing.assert_close(projector.project(gray), apply_f(model.eval(), colour, 1))
    torch.testing.assert_close(projector.distance(gray[0]), projector.distance(colour[:1]))
    export_projector(model, str(tmp_path / "c.pt"), prior=GaussianPrior((3, 28, 28)))
    torch.testing.assert_close(Projector.load(str(tmp_path / "c.pt")).project(gray), projector.project(gray),
                               atol=ATOL, rtol=0)


def test_cli_projects_a_grayscale_png_with_a_colour_model(tmp_path):
    from PIL import Image

    run, _ = colour_run(tmp_path)
    Image.new("L", (40, 40), color=90).save(tmp_path / "sketch.png")
    loaded = load_png(str(tmp_path / "sketch.png"), size=28, channels=3)
    assert loaded.shape == (1, 3, 28, 28) and torch.equal(loaded[:, 0], loaded[:, 2])
    assert main(["project", run, "--images", str(tmp_path / "sketch.png"), "--out", str(tmp_path / "o")]) == 0
    with Image.open(tmp_path / "o" / "sketch_projected.png") as img:
        assert img.mode == "RGB" and img.size == (28, 28)


def test_bad_arguments_name_themselves(runs, tmp_path):
    run, _ = runs["group"]
    projector = Projector.load(run)
    z = projector.noise(2, seed=0)
    for call, fragment in [
        (lambda: projector.project(torch.rand(2, 28, 28, 1)), "images must have shape [B, 1, 28, 28]"),
        (lambda: projector.project(torch.rand(2, 1, 28, 28), steps=0), "steps must be a positive integer"),
        (lambda: projector.generate(-1), "n must be a non-negative integer"),
        (lambda: projector.generate(2, seed=1.5), "seed must be an int"),
        (lambda: projector.interpolate(z, z, 3), "z_a and z_b must each be one sample"),
        (lambda: projector.interpolate(z[0], z[1], 0), "n must be a positive integer"),
        (lambda: projector.arithmetic(z[0], z[1], torch.rand(5)), "z_c must have shape"),
        (lambda: Projector.load({"meta": {}}), "lacks model, prior"),
        (lambda: Projector.load({"meta": {}, "model": {}, "prior": {}}), "lacks model_config or prior_config"),
        (lambda: Projector.load(str(tmp_path / "nothing")), "does not exist"),
    ]:
        with pytest.raises(ValueError) as info:
            call()
        assert fragment in str(info.value) and len(str(info.value).splitlines()) == 1, str(info.value)
    with pytest.raises(TypeError, match="images must be a floating tensor"):
        projector.project(torch.zeros(1, 1, 28, 28, dtype=torch.uint8))
    assert os.path.isdir(run)


def test_projector_checks_values_and_takes_any_float_dtype(runs):
    """Issue 12: NaN passed through silently, float64 and unbatched float64 inputs ended in raw torch errors,
    and [0, 255] pixels were projected without a word."""
    run, _ = runs["group"]
    projector = Projector.load(run)
    images = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    expected = projector.project(images)
    torch.testing.assert_close(projector.project(images.double()), expected)
    torch.testing.assert_close(projector.project(images[1].double()), expected[1:2])
    torch.testing.assert_close(projector.distance(images.double()), projector.distance(images))
    z = projector.noise(2, seed=0)
    torch.testing.assert_close(projector.interpolate(z[0].double(), z[1].double(), 3),
                               projector.interpolate(z[0], z[1], 3))
    noisy = images + 0.5 * torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    assert projector.project(noisy).shape == images.shape  # noise on an image is a fair input
    nan = images.clone()
    nan[1, 0, 3, 3] = float("nan")
    pixels = (images + 1) * 127.5
    for call, fragment in [
        (lambda: projector.project(nan), "images contains NaN or inf"),
        (lambda: projector.distance(nan), "images contains NaN or inf"),
        (lambda: projector.interpolate(z[0] * float("inf"), z[1], 3), "z_a contains NaN or inf"),
        (lambda: projector.project(pixels), "images must be images in [-1, 1]"),
        (lambda: projector.distance(pixels), "scale pixels p in [0, 255] as p / 127.5 - 1"),
    ]:
        with pytest.raises(ValueError) as info:
            call()
        assert fragment in str(info.value) and len(str(info.value).splitlines()) == 1, str(info.value)
