"""The restoration training term (issue 13): corruptions drawn on the device without host reads, the term's
value and gradient against a direct computation, and the trainer/CLI switch."""
import copy

import pytest
import torch

import ign_fast
from ign_fast.corruptions import TrainingCorruptions, parse_kinds, square_masks
from ign_fast.graph_step import HostSyncGuard
from ign_fast.models import DCGAN28


def test_square_masks_hide_one_square_of_the_drawn_side():
    torch.manual_seed(0)
    keep = square_masks(200, 28, 28, (10, 14), "cpu")
    hidden = (~keep).flatten(1).sum(1)
    sides = hidden.double().sqrt()
    assert keep.shape == (200, 1, 28, 28)
    assert torch.equal(sides, sides.round()) and sides.min() >= 10 and sides.max() <= 14  # full squares
    assert len(set(sides.tolist())) == 5  # every side in 10..14 occurs


def test_corruptions_mix_kinds_per_sample_and_keep_the_range():
    torch.manual_seed(0)
    x = torch.rand(64, 1, 28, 28) * 2 - 1
    y = TrainingCorruptions(("mask", "noise"))(x)
    changed = (y != x).flatten(1).float().mean(1)
    # a mask changes one square (at most 14x14 of 28x28 = 25%) to mid-gray; noise changes nearly every pixel
    masked = (changed <= 0.25) & ((y == 0) | (y == x)).flatten(1).all(1)
    noisy = changed > 0.9
    assert masked.sum() > 10 and noisy.sum() > 10 and bool((masked ^ noisy).all())
    assert y.min() >= -1 and y.max() <= 1
    with HostSyncGuard():  # drawn on the device: capture-safe
        TrainingCorruptions()(x)
    toy = torch.randn(8, 2) * 3
    assert (TrainingCorruptions(("noise",))(toy) - toy).abs().max() > 0  # no clipping of toy data
    with pytest.raises(ValueError, match="masks need images"):
        TrainingCorruptions(("mask",))(toy)
    with pytest.raises(ValueError, match="restore_corruptions must be a comma-separated list of mask, noise, gray"):
        parse_kinds("mask,blur")


def test_masks_take_the_fill_restore_feeds_f():
    from ign_fast.operators import MISSING_FILL, Mask

    torch.manual_seed(0)
    x = torch.full((16, 1, 28, 28), -1.0)  # all background: a black-filled hole would change nothing
    y = TrainingCorruptions(("mask",))(x)
    hole = y != x
    sides = hole.flatten(1).sum(1).double().sqrt()
    assert bool((sides >= 10).all()) and bool((y[hole] == MISSING_FILL).all())
    # the same image restore's "project" feeds f for that hole
    torch.testing.assert_close(Mask((~hole).float()).initial(Mask((~hole).float()).A(x)), y, rtol=0, atol=0)
    y = TrainingCorruptions(("mask",), mask_fill=0.5)(x)
    assert bool(((y == 0.5) | (y == -1)).all()) and bool((y == 0.5).any())
    for bad in (1.5, float("nan"), "gray"):
        with pytest.raises(ValueError, match=r"restore_mask_fill must be a number in \[-1, 1\]"):
            TrainingCorruptions(("mask",), mask_fill=bad)


def test_gray_is_the_luminance_in_every_channel_for_rgb_only():
    from ign_fast.operators import Grayscale

    torch.manual_seed(0)
    x = torch.rand(8, 3, 12, 12) * 2 - 1
    y = TrainingCorruptions(("gray",))(x)
    torch.testing.assert_close(y, Grayscale().initial(Grayscale().A(x)), rtol=0, atol=1e-6)
    with HostSyncGuard():
        TrainingCorruptions(("gray", "mask"))(x)
    gray_images = torch.rand(8, 1, 12, 12) * 2 - 1
    mixed = TrainingCorruptions(("gray", "noise"))(gray_images)  # a gray image is its own luminance: noise only
    assert bool(((mixed - gray_images).abs().flatten(1).amax(1) > 0).all())
    with pytest.raises(ValueError, match="gray needs RGB images"):
        TrainingCorruptions(("gray",))(gray_images)


def test_the_restore_term_is_d_f_cx_x_and_trains_f():
    torch.manual_seed(0)
    model = DCGAN28(latent_dim=8, width=8, norm="group").double()
    twin = copy.deepcopy(model)
    fixed = torch.rand(4, 1, 28, 28, dtype=torch.float64) * 2 - 1
    corrupt = lambda x: torch.where(x > 0, x, -torch.ones_like(x))  # noqa: E731  (deterministic for the check)
    loss = ign_fast.NAIGNLoss(candidates_per_sample=2, lambda_restore=3.0)
    step = ign_fast.NAIGNStep(model, torch.optim.SGD(model.parameters(), 0.0), loss=loss, corrupt=corrupt)
    pool = torch.randn(8, 1, 28, 28, dtype=torch.float64)
    out = step.compute_gradients(fixed, pool)
    plain = ign_fast.NAIGNStep(twin, torch.optim.SGD(twin.parameters(), 0.0),
                               loss=ign_fast.NAIGNLoss(candidates_per_sample=2))
    base = plain.compute_gradients(fixed, pool)
    with torch.no_grad():
        direct = (twin(corrupt(fixed)) - fixed).abs().flatten(1).mean(1).mean()
    torch.testing.assert_close(out["restore"], direct, rtol=1e-12, atol=0)
    torch.testing.assert_close(out["loss"], base["loss"] + 3.0 * direct, rtol=1e-12, atol=0)
    extra = torch.autograd.grad(3.0 * (twin(corrupt(fixed)) - fixed).abs().flatten(1).mean(1).mean(),
                                list(twin.parameters()))
    for p, q, g in zip(model.parameters(), twin.parameters(), extra):
        torch.testing.assert_close(p.grad, q.grad + g, rtol=1e-10, atol=1e-12)


def test_the_restore_term_takes_its_own_distance():
    torch.manual_seed(0)
    model = DCGAN28(latent_dim=8, width=8, norm="group").double()
    fixed = torch.rand(4, 1, 28, 28, dtype=torch.float64) * 2 - 1
    corrupt = lambda x: torch.where(x > 0, x, -torch.ones_like(x))  # noqa: E731
    loss = ign_fast.NAIGNLoss(candidates_per_sample=2, lambda_restore=2.0, restore_distance="l2")
    assert loss.config()["restore_distance"] == "l2" and loss.distance == "l1"
    step = ign_fast.NAIGNStep(model, torch.optim.SGD(model.parameters(), 0.0), loss=loss, corrupt=corrupt)
    out = step.compute_gradients(fixed, torch.randn(8, 1, 28, 28, dtype=torch.float64))
    with torch.no_grad():
        direct = (model(corrupt(fixed)) - fixed).square().flatten(1).mean(1).mean()
    torch.testing.assert_close(out["restore"], direct, rtol=1e-12, atol=0)  # squared, while rec stays l1
    with pytest.raises(ValueError, match="restore_distance must be 'l1' or 'l2'"):
        ign_fast.NAIGNLoss(restore_distance="l3")


def _deterministic_corrupt(x):
    # the same c(x) in both modes: the check is on the step's arithmetic, not on the draw
    return torch.where(x > 0.2, x, torch.zeros_like(x))


@pytest.mark.kernels
@pytest.mark.parametrize("norm", ["group", "batch", "none"])
def test_ign_term_fused_matches_reference_in_float64(norm):
    from test_fused_step import assert_same_state

    torch.manual_seed(0)
    ref_model = DCGAN28(latent_dim=8, width=8, norm=norm).double()
    fused_model = copy.deepcopy(ref_model)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.rand(2, 1, 28, 28, generator=g, dtype=torch.float64) * 2 - 1,
                torch.randn(2, 1, 28, 28, generator=g, dtype=torch.float64)) for _ in range(5)]
    loss = ign_fast.IGNLoss("l1", lambda_restore=2.0, restore_distance="l2")
    results = []
    for model, mode in ((ref_model, "reference"), (fused_model, "fused")):
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.5, 0.999))
        step = ign_fast.IGNStep(model, opt, loss=loss, mode=mode, corrupt=_deterministic_corrupt)
        results.append((opt, [step(x, z) for x, z in batches]))
    (ref_opt, ref_terms), (fused_opt, fused_terms) = results
    for a, b in zip(ref_terms, fused_terms):
        assert set(a) == {"loss", "rec", "idem", "tight", "restore"}
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-9, abs=1e-12), key
    assert_same_state(ref_model, ref_opt, fused_model, fused_opt, 1e-9)


def test_ign_term_is_lambda_d_f_cx_x_on_top_of_the_objective():
    torch.manual_seed(0)
    model = DCGAN28(latent_dim=8, width=8, norm="group").double()
    twin = copy.deepcopy(model)
    x = torch.rand(3, 1, 28, 28, dtype=torch.float64) * 2 - 1
    z = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    with_term = ign_fast.IGNStep(model, torch.optim.SGD(model.parameters(), 0.0), mode="fused",
                                 loss=ign_fast.IGNLoss(lambda_restore=3.0), corrupt=_deterministic_corrupt)
    plain = ign_fast.IGNStep(twin, torch.optim.SGD(twin.parameters(), 0.0), mode="fused")
    out, base = with_term.compute_gradients(x, z), plain.compute_gradients(x, z)
    with torch.no_grad():
        direct = (twin(_deterministic_corrupt(x)) - x).abs().flatten(1).mean(1).mean()
    torch.testing.assert_close(out["restore"], direct, rtol=1e-12, atol=0)
    torch.testing.assert_close(out["loss"], base["loss"] + 3.0 * direct, rtol=1e-12, atol=0)
    assert "restore" not in base
    assert isinstance(ign_fast.IGNStep(model, torch.optim.SGD(model.parameters(), 0.0),
                                       loss=ign_fast.IGNLoss(lambda_restore=1.0)).corrupt, TrainingCorruptions)
    with pytest.raises(TypeError, match="corrupt must be callable"):
        ign_fast.IGNStep(model, torch.optim.SGD(model.parameters(), 0.0), corrupt=3)


def test_trainer_and_cli_switch_it_on(tmp_path, capsys):
    from ign_fast.cli import main

    run = str(tmp_path / "run")
    argv = ["train", "--steps", "3", "--batch-size", "8", "--candidates", "2", "--width", "8", "--latent-dim", "8",
            "--no-progress", "--log-every", "1", "--lambda-restore", "1", "--out", run]
    assert main(argv) == 0
    assert "restore" in open(f"{run}/metrics.csv").readline()
    capsys.readouterr()
    assert main(argv[:-1] + [str(tmp_path / "r2"), "--restore-corruptions", "blur"]) == 2
    assert "restore_corruptions must be a comma-separated list" in capsys.readouterr().err
    assert main(argv[:-1] + [str(tmp_path / "r5"), "--restore-distance", "l3"]) == 2
    assert "restore_distance must be 'l1', 'l2' or None" in capsys.readouterr().err
    assert main(argv[:-1] + [str(tmp_path / "r4"), "--restore-mask-fill", "2"]) == 2
    err = capsys.readouterr().err
    assert "restore_mask_fill must be a number in [-1, 1]" in err and err.count("\n") == 1
    assert main(["train", "--objective", "ign", *argv[1:-1], str(tmp_path / "r3")]) == 0  # the term for IGN too
    assert "restore" in open(f"{tmp_path}/r3/metrics.csv").readline()
