"""ign_fast.manifold (drift, energy, AUROC, OOD report) and ign_fast.plots."""
import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn

from ign_fast import manifold, plots
from ign_fast.models import DCGAN28, MLP


class Constant(nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = nn.Parameter(torch.as_tensor(value, dtype=torch.float32))

    def forward(self, x):
        return self.value.expand_as(x)


class Clamp(nn.Module):
    """Projects onto the cube [-1, 1]^D: idempotent, exact identity on image-range data."""

    def forward(self, x):
        return x.clamp(-1, 1)


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- manifold_distance


@pytest.mark.parametrize("shape", [(9, 1, 28, 28), (9, 2), (9, 1)])
def test_identity_model_has_zero_drift(shape):
    y = torch.randn(shape)
    for distance in ("l2", "l1"):
        assert torch.equal(manifold.manifold_distance(nn.Identity(), y, distance=distance), torch.zeros(9))


def test_constant_model_drift_is_the_distance_to_the_constant():
    c = torch.tensor([0.5, -1.0, 2.0])
    y = torch.randn(20, 3)
    model = Constant(c)
    expected_rms = (y - c).square().mean(1).sqrt()
    expected_mean_abs = (y - c).abs().mean(1)
    torch.testing.assert_close(manifold.manifold_distance(model, y), expected_rms)
    torch.testing.assert_close(manifold.manifold_distance(model, y, distance="l1"), expected_mean_abs)
    # Constant is idempotent: more steps change nothing.
    torch.testing.assert_close(manifold.manifold_distance(model, y, steps=3), expected_rms)


def test_steps_apply_the_model_repeatedly():
    y = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    halve = lambda x: x / 2  # noqa: E731 - any callable works, not only modules
    d = manifold.manifold_distance(halve, y, steps=2)
    assert d.dtype == torch.float64
    torch.testing.assert_close(d, 0.75 * y.reshape(6, -1).square().mean(1).sqrt())


def test_drift_is_batch_size_independent_and_uses_eval_mode():
    torch.manual_seed(0)
    model = DCGAN28(latent_dim=8, width=8)  # BatchNorm: train-mode output would depend on the batch
    y = torch.rand(10, 1, 28, 28) * 2 - 1
    model.train()
    whole = manifold.manifold_distance(model, y, batch_size=1024)
    assert model.training  # mode restored
    torch.testing.assert_close(manifold.manifold_distance(model, y, batch_size=3), whole)
    model.eval()
    with torch.no_grad():
        expected = (model(y) - y).reshape(10, -1).square().mean(1).sqrt()
    torch.testing.assert_close(whole, expected)
    assert not whole.requires_grad
    # float64 points go through the float32 model; the distance comes back in float64.
    torch.testing.assert_close(manifold.manifold_distance(model, y.double()), whole.double())


def test_manifold_distance_rejects_bad_arguments():
    with pytest.raises(ValueError, match="distance"):
        manifold.manifold_distance(nn.Identity(), torch.zeros(2, 2), distance="l3")
    with pytest.raises(ValueError, match="steps"):
        manifold.manifold_distance(nn.Identity(), torch.zeros(2, 2), steps=0)
    with pytest.raises(TypeError, match="y must be"):
        manifold.manifold_distance(nn.Identity(), torch.zeros(2, 2, dtype=torch.long))


# ----------------------------------------------------------------------------- energy


def test_energy_is_squared_rms_drift_over_temperature():
    c = torch.zeros(4)
    y = torch.randn(7, 4)
    mean_square = y.square().mean(1)
    torch.testing.assert_close(manifold.energy(Constant(c), y), mean_square)
    torch.testing.assert_close(manifold.energy(Constant(c), y, temperature=0.5), 2 * mean_square)
    assert torch.equal(manifold.energy(nn.Identity(), y), torch.zeros(7))
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            manifold.energy(nn.Identity(), y, temperature=bad)


# ----------------------------------------------------------------------------- AUROC


def brute_force_auroc(scores_in, scores_out):
    pairs = list(itertools.product(scores_in, scores_out))
    return sum(1.0 if o > i else 0.5 if o == i else 0.0 for i, o in pairs) / len(pairs)


def test_auroc_on_constructed_cases():
    assert manifold.auroc([0.1, 0.2, 0.3], [0.5, 0.9]) == 1.0
    assert manifold.auroc([0.5, 0.9], [0.1, 0.2, 0.3]) == 0.0
    assert manifold.auroc(torch.ones(5), torch.ones(8)) == 0.5
    x = torch.randn(100)
    assert manifold.auroc(x, x) == 0.5
    # Pairs (0,1) (0,2) (1,1) (1,2): 1 + 1 + 0.5 + 1 over 4.
    assert manifold.auroc([0, 1], [1, 2]) == 0.875


def test_auroc_hand_computed_with_ties():
    # in [1, 2, 2, 3] vs out [2, 3, 3, 4], pair by pair (out > in: 1, equal: 1/2):
    #   in 1: 2 3 3 4 all higher            -> 4
    #   in 2 (twice): 2 ties, 3 3 4 higher  -> 2 x 3.5 = 7
    #   in 3: 2 lower, 3 3 tie, 4 higher    -> 0 + 0.5 + 0.5 + 1 = 2
    # 13 of 16 pairs
    assert manifold.auroc([1, 2, 2, 3], [2, 3, 3, 4]) == 13 / 16
    # the order of the scores does not matter, and swapping the roles gives 1 - AUROC
    assert manifold.auroc(torch.tensor([3.0, 2, 1, 2]), torch.tensor([4.0, 3, 2, 3])) == 13 / 16
    assert manifold.auroc([2, 3, 3, 4], [1, 2, 2, 3]) == 3 / 16
    # separated except for a tie at the boundary: in [0, 0, 1] vs out [1, 1] -> 4 higher + 2 ties = 5 of 6
    assert manifold.auroc([0, 0, 1], [1, 1]) == 5 / 6
    # one score each: higher, equal, lower
    assert (manifold.auroc([0.0], [1e-300]), manifold.auroc([7.0], [7.0]), manifold.auroc([1.0], [-1.0])) == (
        1.0, 0.5, 0.0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-3, 3), min_size=1, max_size=12), st.lists(st.integers(-3, 3), min_size=1, max_size=12))
def test_auroc_matches_the_pairwise_definition_with_ties(scores_in, scores_out):
    assert manifold.auroc(scores_in, scores_out) == pytest.approx(brute_force_auroc(scores_in, scores_out), abs=1e-15)


def test_auroc_rejects_empty_and_nan():
    with pytest.raises(ValueError, match="scores_in"):
        manifold.auroc([], [1.0])
    with pytest.raises(ValueError, match="scores_out contains NaN"):
        manifold.auroc([1.0], [float("nan")])


# ----------------------------------------------------------------------------- OOD report


def test_ood_report_on_a_tiny_image_model_has_four_aurocs():
    torch.manual_seed(0)
    heldout = torch.rand(8, 1, 28, 28) * 2 - 1
    report = manifold.ood_report(DCGAN28(latent_dim=8, width=8), heldout)
    assert set(report) == {"gaussian_noise", "uniform_noise", "inverted", "rotated_90"}
    assert all(0.0 <= v <= 1.0 for v in report.values())


def test_ood_report_known_answers_for_a_projection():
    # Clamp is the identity on [-1, 1] data: held-out drift is 0; gaussian noise leaves the cube
    # (drift > 0) while uniform noise, inversions and rotations stay in it (drift 0, a coin flip).
    heldout = torch.rand(50, 1, 8, 8) * 2 - 1
    report = manifold.ood_report(Clamp(), heldout, generator=torch.Generator().manual_seed(1))
    assert report == {"gaussian_noise": 1.0, "uniform_noise": 0.5, "inverted": 0.5, "rotated_90": 0.5}


def test_ood_report_on_2d_points_and_bad_shapes():
    report = manifold.ood_report(MLP(2, hidden=8, depth=1), torch.randn(30, 2))
    assert len(report) == 4 and all(0.0 <= v <= 1.0 for v in report.values())
    with pytest.raises(ValueError, match="rotate"):
        manifold.ood_report(nn.Identity(), torch.randn(4, 1, 8, 6))
    with pytest.raises(ValueError, match="rotate"):
        manifold.ood_report(nn.Identity(), torch.randn(4, 3))


# ----------------------------------------------------------------------------- plots


def test_save_image_grid_writes_a_png_of_the_right_size(tmp_path):
    images = -torch.ones(10, 1, 28, 28)
    images[0] = 1.0  # first tile white
    path = plots.save_image_grid(images, tmp_path / "sub" / "grid.png", nrow=4)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.mode == "L"
        assert img.size == (4 * (28 + 2) + 2, 3 * (28 + 2) + 2)  # 4 columns, ceil(10/4) = 3 rows
        pixels = torch.from_numpy(np.array(img))
    assert pixels[2:30, 2:30].eq(255).all() and pixels[:2].eq(0).all() and pixels[2:30, 32:60].eq(0).all()
    rgb = plots.save_image_grid(torch.zeros(3, 3, 8, 8), tmp_path / "rgb.png", nrow=8)
    with Image.open(rgb) as img:
        assert img.mode == "RGB" and img.size == (3 * 10 + 2, 12)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["grid.png"]  # no temp files left


def test_save_image_grid_rejects_bad_images(tmp_path):
    with pytest.raises(ValueError, match="images must be"):
        plots.save_image_grid(torch.zeros(2, 2, 8, 8), tmp_path / "x.png", nrow=2)
    with pytest.raises(ValueError, match="nrow"):
        plots.save_image_grid(torch.zeros(2, 1, 8, 8), tmp_path / "x.png", nrow=0)


def test_matplotlib_plots_write_files(tmp_path):
    pytest.importorskip("matplotlib")
    paths = [
        plots.save_histogram_1d(torch.randn(500, 1), torch.randn(500), tmp_path / "hist.png"),
        plots.save_scatter_2d(torch.randn(300, 2), torch.randn(300, 2), tmp_path / "scatter.png"),
        plots.save_distance_field(MLP(2, hidden=8, depth=1), tmp_path / "field.png", resolution=32,
                                  data=torch.randn(50, 2)),
        plots.save_class_histogram({"histogram": [0.1] * 10}, tmp_path / "classes.png"),
    ]
    for path in paths:
        with Image.open(path) as img:
            assert img.format == "PNG" and min(img.size) > 100


def test_matplotlib_missing_gives_an_install_hint(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plots.save_class_histogram([0.5, 0.5], tmp_path / "c.png")
    plots.save_image_grid(torch.zeros(1, 1, 4, 4), tmp_path / "still_works.png", nrow=1)
