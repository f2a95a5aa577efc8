"""Measurement operators: every adjoint against its definition (<A x, y> = <x, A^T y>), consistency keeps A x = y
and is the nearest such x, composition, and one-line shape errors."""
import pytest
import torch

from ign_fast.operators import (MISSING_FILL, Compose, Downsample, Edges, Grayscale, Identity, Mask, consistent_cg,
                                random_square_mask)


def _known(shape, seed=0):
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) > 0.3).float()


OPERATORS = {
    "identity": (lambda: Identity(), (3, 2, 8, 8)),
    "mask_per_image": (lambda: Mask(_known((3, 2, 8, 8))), (3, 2, 8, 8)),
    "mask_shared_hw": (lambda: Mask(_known((8, 8))), (3, 2, 8, 8)),
    "grayscale": (lambda: Grayscale(), (3, 3, 8, 8)),
    "downsample2": (lambda: Downsample(2), (3, 2, 8, 8)),
    "downsample4": (lambda: Downsample(4), (3, 1, 8, 8)),
    "compose_gray_down": (lambda: Compose(Grayscale(), Downsample(2)), (3, 3, 8, 8)),
    "compose_mask_down": (lambda: Downsample(2) * Mask(_known((8, 8))), (3, 1, 8, 8)),
}


@pytest.mark.parametrize("name", OPERATORS)
def test_adjoint(name):
    make, shape = OPERATORS[name]
    op = make()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    ax = op.A(x)
    y = torch.randn(ax.shape, generator=g, dtype=torch.float64)
    lhs, rhs = (ax * y).sum(), (x * op.A_adjoint(y)).sum()
    assert torch.allclose(lhs, rhs, rtol=1e-10, atol=1e-10), (lhs, rhs)


def test_adjoint_check_can_fail():
    # A wrong adjoint (nearest upsampling without the 1/factor^2) must be caught by the same inner-product test.
    op = Downsample(2)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    y = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    wrong = torch.nn.functional.interpolate(y, scale_factor=2, mode="nearest")
    assert not torch.allclose((op.A(x) * y).sum(), (x * wrong).sum())


@pytest.mark.parametrize("name", [n for n in OPERATORS if n != "identity"])
def test_consistent_keeps_measurements_and_is_nearest(name):
    make, shape = OPERATORS[name]
    op = make()
    g = torch.Generator().manual_seed(2)
    truth, guess = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g,
                                                                                      dtype=torch.float64)
    y = op.A(truth)
    fixed = op.consistent(guess, y)
    torch.testing.assert_close(op.A(fixed), y, rtol=1e-7, atol=1e-7)
    # The closed form is the orthogonal projection onto {A x = y}: the same answer as CG, and idempotent.
    torch.testing.assert_close(fixed, consistent_cg(op, guess, y, iterations=100), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(op.consistent(fixed, y), fixed, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", [n for n in OPERATORS if n != "identity"])
def test_initial_is_consistent(name):
    make, shape = OPERATORS[name]
    op = make()
    y = op.A(torch.rand(shape, dtype=torch.float64) * 2 - 1)
    torch.testing.assert_close(op.A(op.initial(y)), y, rtol=1e-7, atol=1e-7)


def test_mask_keeps_known_pixels_and_fills_the_rest():
    known = torch.ones(1, 1, 6, 6)
    known[..., 1:3, 2:5] = 0
    op = Mask(known)
    x = torch.rand(2, 1, 6, 6)
    y = op.A(x)
    assert torch.equal(y[..., 1:3, 2:5], torch.zeros(2, 1, 2, 3))
    start = op.initial(y)
    # what f is fed: the hole at mid-gray, a value f can tell from the black background
    assert torch.equal(start[..., 1:3, 2:5], torch.full((2, 1, 2, 3), MISSING_FILL)) and MISSING_FILL == 0.0
    assert torch.equal(start * known, x * known)
    # what is shown and scored: the hole black, the masked digit
    shown = op.corrupted_image(y)
    assert torch.equal(shown[..., 1:3, 2:5], torch.full((2, 1, 2, 3), -1.0))
    assert torch.equal(shown * known, x * known)
    assert torch.equal(Mask(known, fill=0.5).initial(y)[..., 1:3, 2:5], torch.full((2, 1, 2, 3), 0.5))
    # other operators show what they feed f
    down = Downsample(2)
    assert torch.equal(down.corrupted_image(down.A(x)), down.initial(down.A(x)))


@pytest.mark.parametrize("fill", [1.5, -2, float("nan"), "gray"])
def test_mask_fill_outside_the_image_range_is_refused(fill):
    with pytest.raises(ValueError, match="fill must be a number in \\[-1, 1\\]"):
        Mask(torch.ones(4, 4), fill=fill)


def test_grayscale_initial_is_the_gray_image():
    y = torch.rand(2, 1, 5, 5) * 2 - 1
    torch.testing.assert_close(Grayscale().initial(y), y.expand(-1, 3, -1, -1), rtol=1e-6, atol=1e-6)


def test_identity_noisy_is_not_exact():
    assert Identity().exact and not Identity(0.5).exact
    x, y = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    assert torch.equal(Identity(0.5).consistent(x, y), x)
    assert torch.equal(Identity().consistent(x, y), y)


def test_random_square_mask_sides():
    known = random_square_mask(50, 28, side_range=(10, 14), generator=torch.Generator().manual_seed(0))
    missing = (known == 0).flatten(1).sum(1)
    sides = missing.float().sqrt()
    assert known.shape == (50, 1, 28, 28)
    assert torch.equal(sides, sides.round()) and sides.min() >= 10 and sides.max() <= 14


@pytest.mark.parametrize("call, match", [
    (lambda: Downsample(2).A(torch.zeros(1, 1, 7, 8)), r"Downsample\(2\)\.A expects x: \[B, C, H, W\] with H and W"),
    (lambda: Grayscale().A(torch.zeros(1, 1, 4, 4)), r"Grayscale\(\)\.A expects x: \[B, 3, H, W\]"),
    (lambda: Grayscale().A_adjoint(torch.zeros(1, 3, 4, 4)), r"A_adjoint expects y"),
    (lambda: Mask(torch.ones(5, 5)).A(torch.zeros(1, 1, 4, 4)), r"Mask.*broadcasts to, got x of shape"),
    (lambda: Mask(torch.full((4, 4), 0.5)), r"known must hold only 0"),
    (lambda: Mask(torch.ones(4)), r"known must be a mask of at least"),
    (lambda: Downsample(0), r"factor must be a positive integer"),
    (lambda: Identity(-1.0), r"sigma must be a finite number"),
    (lambda: Compose(), r"operators must name"),
    (lambda: Compose(Grayscale(), object()), r"operators\[1\] must have A and A_adjoint"),
])
def test_errors_are_one_line_and_name_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match) as info:
        call()
    assert "\n" not in str(info.value)


def test_edges_is_the_sketch_corruption_and_nonlinear():
    from ign_fast.cli import corrupt

    x = torch.rand(4, 1, 12, 12, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert torch.equal(Edges().hard(x), corrupt(x, "sketch", torch.Generator()))
    assert torch.equal(Edges(softness=0).A(x), Edges().hard(x))
    soft = Edges().A(x.requires_grad_(True))
    soft.sum().backward()  # "latent" fits it by gradient descent: finite gradients everywhere
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert not Edges.linear and not Edges.exact
    with pytest.raises(NotImplementedError, match="nonlinear"):
        Edges().A_adjoint(x)
