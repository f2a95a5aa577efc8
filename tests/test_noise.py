import json
import math

import pytest
import torch

from ign_fast.data import load_mnist5k
from ign_fast.noise import FourierPrior, GaussianPrior, MixturePrior, NoisePrior, build_prior

from conftest import devices

N_SAMPLES = 20_000
# Tolerance: each bin of a sample is gaussian, so over n draws the sample mean has standard error
# std/sqrt(n) and the sample std std/sqrt(2n). At 5.5 standard errors a single check fails with
# probability 4e-8; MNIST has 1*28*15 bins * 2 parts * 2 statistics = 1680 checks, so a correct
# sampler fails < 1e-4 of the time, while a pair-averaging bug (std / sqrt(2)) is ~40 standard errors off.
Z = 5.5


def spectrum_stats(x):
    spec = torch.fft.rfft2(x.double())
    return [(part.mean(0), part.std(0, correction=0)) for part in (spec.real, spec.imag)]


def assert_spectrum_matches(samples, data):
    n = samples.shape[0]
    # Float32 FFT round trips leave ~1e-6 relative noise; give zero-std bins (imaginary part of the
    # real-valued bins) an absolute floor on that scale.
    floor = 1e-4 * max(s.max().item() for _, s in spectrum_stats(data))
    for (mean_s, std_s), (mean_d, std_d), part in zip(spectrum_stats(samples), spectrum_stats(data), ("re", "im")):
        mean_err = (mean_s - mean_d).abs() - (Z * std_d / math.sqrt(n) + floor)
        std_err = (std_s - std_d).abs() - (Z * std_d / math.sqrt(2 * n) + floor)
        assert mean_err.max() <= 0, f"{part} mean off in bin {divmod(mean_err.argmax().item(), mean_err.shape[-1])}"
        assert std_err.max() <= 0, f"{part} std off in bin {divmod(std_err.argmax().item(), std_err.shape[-1])}"


# ----------------------------------------------------------------------------- gaussian


def test_gaussian_prior_shape_and_stats():
    prior = GaussianPrior((1, 28, 28))
    assert isinstance(prior, NoisePrior) and prior.kind == "gaussian"
    z = prior.sample(2000, generator=torch.Generator().manual_seed(0))
    assert z.shape == (2000, 1, 28, 28) and z.dtype == torch.float32
    # 1.57M draws: mean s.e. 8e-4, std s.e. 6e-4.
    assert abs(z.mean().item()) < 0.005 and abs(z.std().item() - 1) < 0.005
    assert GaussianPrior(2).sample(3, dtype=torch.float64).shape == (3, 2)
    assert GaussianPrior([2]).sample(3, dtype=torch.float64).dtype == torch.float64
    assert prior.sample(0).shape == (0, 1, 28, 28)


def test_gaussian_same_generator_same_samples():
    prior = GaussianPrior((3, 4))
    a = prior.sample(5, generator=torch.Generator().manual_seed(1))
    rebuilt = build_prior(prior.to_config(), state_dict=prior.state_dict())
    b = rebuilt.sample(5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- fourier


def test_fourier_mnist_spectrum_matches_in_every_bin():
    data, _ = load_mnist5k("train")
    prior = FourierPrior.fit(data)
    assert prior.shape == (1, 28, 28) and prior.kind == "fourier" and int(prior.num_fitted) == 4000
    samples = prior.sample(N_SAMPLES, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (N_SAMPLES, 1, 28, 28) and samples.dtype == torch.float32
    assert_spectrum_matches(samples, data)


def synthetic_images(n, c, h, w, seed=0):
    """Images with structure in every bin: a mean pattern, per-pixel scales and cross-pixel correlation."""
    g = torch.Generator().manual_seed(seed)
    pattern = torch.randn(c, h, w, generator=g)
    scale = 0.5 + torch.rand(c, h, w, generator=g)
    noise = torch.randn(n, c, h, w, generator=g) * scale
    return pattern + noise + 0.7 * noise.roll(1, dims=-1) + 0.3 * noise.roll(1, dims=-2)


@pytest.mark.parametrize("h,w", [(5, 7), (4, 6), (5, 6), (4, 7), (1, 1), (2, 2), (1, 6)])
def test_fourier_odd_and_even_sizes_match_in_every_bin(h, w):
    data = synthetic_images(4000, 2, h, w)
    prior = FourierPrior.fit(data, chunk_size=999)  # exercise the chunked accumulation
    samples = prior.sample(N_SAMPLES, generator=torch.Generator().manual_seed(1))
    assert samples.shape == (N_SAMPLES, 2, h, w)
    assert_spectrum_matches(samples, data)


def test_fourier_fit_recovers_white_noise_spectrum():
    # Known spectrum of N(0, 1) pixels on 4x6: real bins (DC, Nyquist rows/cols) have re std
    # sqrt(HW) and no imaginary part; all other bins have re and im std sqrt(HW / 2).
    h, w = 4, 6
    data = torch.randn(20_000, 1, h, w, generator=torch.Generator().manual_seed(0))
    prior = FourierPrior.fit(data)
    real_bin = torch.zeros(h, w // 2 + 1, dtype=torch.bool)
    for k1 in (0, h // 2):
        for k2 in (0, w // 2):
            real_bin[k1, k2] = True
    expected_re = torch.where(real_bin, math.sqrt(h * w), math.sqrt(h * w / 2))
    expected_im = torch.where(real_bin, 0.0, math.sqrt(h * w / 2))
    # Sample std over 20k draws: relative s.e. 0.5%; 3% is 6 s.e.
    torch.testing.assert_close(prior.std_real[0], expected_re, rtol=0.03, atol=0)
    torch.testing.assert_close(prior.std_imag[0], expected_im, rtol=0.03, atol=0)
    assert prior.mean_real.abs().max() < 0.1 and prior.mean_imag.abs().max() < 0.1


def test_fourier_stats_are_hermitian_consistent():
    prior = FourierPrior.fit(synthetic_images(500, 1, 6, 8))
    for j in (0, 4):
        col = lambda name: getattr(prior, name)[0, :, j]  # noqa: E731
        mirror = (-torch.arange(6)) % 6
        assert torch.equal(col("mean_real"), col("mean_real")[mirror])
        assert torch.equal(col("mean_imag"), -col("mean_imag")[mirror])
        assert torch.equal(col("std_real"), col("std_real")[mirror])
        assert torch.equal(col("std_imag"), col("std_imag")[mirror])
        assert col("std_imag")[0] == 0 and col("std_imag")[3] == 0 and col("mean_imag")[3] == 0


def test_fourier_config_and_state_dict_round_trip():
    prior = FourierPrior.fit(synthetic_images(300, 3, 5, 6))
    config = json.loads(json.dumps(prior.to_config()))
    assert config == {"kind": "fourier", "shape": [3, 5, 6]}
    state = prior.state_dict()
    assert {"mean_real", "std_real", "mean_imag", "std_imag", "num_fitted"} == set(state)
    rebuilt = build_prior(config, state_dict=state)
    assert isinstance(rebuilt, FourierPrior)
    a = prior.sample(7, generator=torch.Generator().manual_seed(3))
    b = rebuilt.sample(7, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert rebuilt.sample(2, dtype=torch.float64).dtype == torch.float64


def test_build_prior_convenience():
    data = synthetic_images(50, 1, 4, 4)
    assert isinstance(build_prior("fourier", data=data), FourierPrior)
    assert build_prior("gaussian", shape=(2,)).shape == (2,)
    assert build_prior("gaussian", data=data).shape == (1, 4, 4)
    assert build_prior({"kind": "gaussian", "shape": [1, 4, 4]}).sample(2).shape == (2, 1, 4, 4)
    assert build_prior({"kind": "fourier", "shape": [1, 4, 4]}, data=data).shape == (1, 4, 4)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="kind must be one of"):
        build_prior("uniform", shape=(2,))
    with pytest.raises(ValueError, match="shape must be given"):
        build_prior("gaussian")
    with pytest.raises(ValueError, match="data must be given"):
        build_prior("fourier")
    with pytest.raises(ValueError, match="config must have keys"):
        build_prior({"kind": "gaussian"})
    with pytest.raises(TypeError, match="kind_or_config"):
        build_prior(3)
    with pytest.raises(ValueError, match="contradicts"):
        build_prior("fourier", data=synthetic_images(10, 1, 4, 4), shape=(1, 5, 5))
    with pytest.raises(ValueError, match="shape must hold positive ints"):
        GaussianPrior((2, 0))
    with pytest.raises(TypeError, match="shape"):
        GaussianPrior("2")
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        FourierPrior((4, 4))
    with pytest.raises(ValueError, match=r"data must be a real float tensor \[N, C, H, W\]"):
        FourierPrior.fit(torch.zeros(10, 4, 4))
    with pytest.raises(ValueError, match="at least 2 samples"):
        FourierPrior.fit(torch.zeros(1, 1, 4, 4))
    with pytest.raises(TypeError, match="data must be a torch.Tensor"):
        FourierPrior.fit([[1.0]])
    with pytest.raises(ValueError, match="NaN"):
        FourierPrior.fit(torch.full((3, 1, 2, 2), float("nan")))
    with pytest.raises(RuntimeError, match="no statistics"):
        FourierPrior((1, 4, 4)).sample(2)
    with pytest.raises(ValueError, match="n must be >= 0"):
        GaussianPrior(2).sample(-1)
    with pytest.raises(TypeError, match="n must be an int"):
        GaussianPrior(2).sample(2.0)
    with pytest.raises(TypeError, match="dtype"):
        GaussianPrior(2).sample(2, dtype=torch.int64)


@pytest.mark.parametrize("device", devices())
def test_priors_follow_module_device_and_cpu_generator_is_reproducible(device):
    fourier = FourierPrior.fit(synthetic_images(100, 1, 5, 6)).to(device)
    gaussian = GaussianPrior((1, 5, 6)).to(device)
    mixture = MixturePrior.fit(synthetic_images(100, 1, 5, 6), components=4, rank=2).to(device)
    for prior in (fourier, gaussian, mixture):
        z = prior.sample(4)
        assert z.device.type == torch.device(device).type
        # A CPU generator gives the CPU numbers wherever the samples end up.
        on_device = prior.sample(4, generator=torch.Generator().manual_seed(2))
        on_cpu = prior.to("cpu").sample(4, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(on_device.cpu(), on_cpu, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- mixture


def three_clusters(n_per=(600, 300, 100), dim=6, seed=0):
    """Points around three far-apart centers, each cluster stretched along its own axis: [N, dim], and the
    known (center, share, stretched axis, its std, the others' std) of each."""
    g = torch.Generator().manual_seed(seed)
    parts, truth = [], []
    for j, count in enumerate(n_per):
        center = torch.zeros(dim)
        center[j] = 20.0
        std = torch.full((dim,), 0.1)
        std[(j + 3) % dim] = 2.0
        parts.append(center + std * torch.randn(count, dim, generator=g))
        truth.append((center, count / sum(n_per), (j + 3) % dim, 2.0, 0.1))
    return torch.cat(parts), truth


def test_mixture_fit_recovers_known_clusters_and_samples_follow_them():
    data, truth = three_clusters()
    prior = MixturePrior.fit(data, components=3, rank=1)
    assert prior.shape == (6,) and prior.to_config() == {"kind": "mixture", "shape": [6]}
    samples = prior.sample(30_000, generator=torch.Generator().manual_seed(1))
    for center, share, axis, stretched, other in truth:
        j = int((prior.means - center).norm(dim=1).argmin())
        torch.testing.assert_close(prior.means[j], center, atol=0.3, rtol=0)
        assert abs(float(prior.weights[j]) - share) < 1e-6
        assert abs(float(prior.directions[j, 0, axis].abs()) - 1) < 1e-3  # its one direction: the stretched axis
        assert abs(float(prior.stds[j, 0]) - stretched) < 0.25
        assert abs(float(prior.residual_stds[j]) - other) < 0.02
        mine = samples[(samples - center).norm(dim=1) < 10]
        assert abs(mine.shape[0] / samples.shape[0] - share) < 0.015
        std = mine.std(0)
        assert abs(float(std[axis]) - stretched) < 0.15
        assert (std[torch.arange(6) != axis] - other).abs().max() < 0.02


def test_mixture_rebuilds_from_state_dict_and_is_reproducible():
    data, _ = three_clusters()
    prior = MixturePrior.fit(data.view(-1, 1, 2, 3), components=4, rank=2)
    rebuilt = build_prior(json.loads(json.dumps(prior.to_config())), state_dict=prior.state_dict())
    assert isinstance(rebuilt, MixturePrior) and rebuilt.shape == (1, 2, 3)
    a = prior.sample(50, generator=torch.Generator().manual_seed(7))
    assert a.shape == (50, 1, 2, 3)
    assert torch.equal(a, rebuilt.sample(50, generator=torch.Generator().manual_seed(7)))
    assert not torch.equal(a, prior.sample(50, generator=torch.Generator().manual_seed(8)))
    assert prior.sample(3, dtype=torch.float64).dtype == torch.float64
    assert prior.sample(0).shape == (0, 1, 2, 3)
    # fitting is deterministic: the same data gives the same prior
    again = MixturePrior.fit(data.view(-1, 1, 2, 3), components=4, rank=2)
    assert all(torch.equal(x, y) for x, y in zip(prior.state_dict().values(), again.state_dict().values()))


def test_mixture_caps_rank_at_the_dimension_and_survives_tiny_clusters():
    data = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [9.0, -9.0]])
    prior = MixturePrior.fit(data, components=3, rank=8)
    assert prior.stds.shape == (3, 2)
    assert torch.isfinite(prior.sample(100)).all()
    assert abs(float(prior.weights.sum()) - 1) < 1e-6


def test_mixture_prior_on_mnist_draws_digit_like_noise():
    digits = load_mnist5k("train")[0]
    prior = build_prior("mixture", data=digits, components=16, rank=4)
    samples = prior.sample(4000, generator=torch.Generator().manual_seed(0))
    # the mixture's mean is the data's mean (weights are the cluster shares), and its samples' total variance
    # is the data's: what the fitted directions miss, each cluster's residual noise carries
    torch.testing.assert_close(samples.mean(0), digits.mean(0), atol=0.1, rtol=0)
    assert abs(float(samples.var(0).sum() / digits.var(0).sum()) - 1) < 0.05


def test_mixture_bad_inputs_are_one_line_errors():
    data, _ = three_clusters()
    with pytest.raises(ValueError, match=r"components must be at most the number of data samples \(1000\), got 5000"):
        MixturePrior.fit(data, components=5000)
    with pytest.raises(ValueError, match="rank must be a positive int, got 0"):
        MixturePrior.fit(data, rank=0)
    with pytest.raises(ValueError, match="components must be a positive int"):
        MixturePrior.fit(data, components=2.5)
    bad = data.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        MixturePrior.fit(bad, components=3)
    with pytest.raises(ValueError, match="data must be given to fit a mixture prior"):
        build_prior("mixture", shape=(6,))
    with pytest.raises(RuntimeError, match="no statistics"):
        MixturePrior((6,)).sample(2)
