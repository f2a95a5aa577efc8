"""ign_fast.metrics: Frechet distance, mode coverage, PRDC, novelty, toy coverage, the digit classifier."""
import ast
import json
import math
import os
import sys
import time

import pytest
import torch

from ign_fast import metrics
from ign_fast.data import TOY_MODES, eight_gaussians, load_mnist5k, rings, toy_curve, two_moons

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def mnist():
    train, _ = load_mnist5k("train")
    test, test_labels = load_mnist5k("test")
    return train, test, test_labels


@pytest.fixture(scope="session")
def cold_eval(tmp_path_factory):
    """`ign-fast eval` as on a fresh install: the classifier cache (a temporary one, never the user's) is
    empty, so the session's one real training of the classifier happens inside the command, under
    evaluate_digits' no_grad, where it once failed (issue 12). (exit code, cache, seconds, report path)."""
    from ign_fast.cli import main

    root = tmp_path_factory.mktemp("cold_eval")
    cache, run, report = root / "cache", str(root / "run"), root / "report.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IGN_FAST_CACHE", str(cache))
        assert main(["train", "--latent-dim", "8", "--width", "8", "--batch-size", "16", "--no-progress",
                     "--steps", "1", "--out", run]) == 0
        start = time.perf_counter()
        code = main(["eval", run, "--n", "50", "--out", str(report)])
        seconds = time.perf_counter() - start
    return code, cache, seconds, report


@pytest.fixture(scope="session")
def trained_classifier(cold_eval):
    """The real classifier, as the cold `ign-fast eval` above trained and cached it."""
    _, cache, seconds, _ = cold_eval
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IGN_FAST_CACHE", str(cache))
        classifier = metrics.load_digit_classifier()
    return classifier, cache, seconds


def with_exact_stats(mean, cov, n=400, seed=0):
    """n points whose empirical mean and (n-1)-normalised covariance are exactly mean and cov."""
    mean, cov = torch.as_tensor(mean, dtype=torch.float64), torch.as_tensor(cov, dtype=torch.float64)
    z = torch.randn(n, mean.numel(), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(z.T @ z / (n - 1))).T  # whiten: covariance I
    return z @ torch.linalg.cholesky(cov).T + mean


# ----------------------------------------------------------------------------- Frechet distance


def test_frechet_distance_of_a_set_with_itself_is_zero():
    x = torch.randn(500, 16)
    assert metrics.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)
    assert metrics.frechet_distance(x.numpy(), x.numpy()) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_matches_the_closed_form_for_commuting_covariances():
    a = with_exact_stats([0.0, 1.0, -2.0], torch.diag(torch.tensor([1.0, 4.0, 0.25])))
    b = with_exact_stats([1.0, 1.0, 0.0], torch.diag(torch.tensor([9.0, 1.0, 0.25])), n=300, seed=1)
    # ||dmu||^2 + sum (sqrt(s_a) - sqrt(s_b))^2 = (1 + 0 + 4) + (4 + 1 + 0)
    assert metrics.frechet_distance(a, b) == pytest.approx(10.0, abs=1e-9)


def test_frechet_distance_matches_the_closed_form_for_non_commuting_covariances():
    cov_a = torch.tensor([[2.0, 0.9], [0.9, 1.0]], dtype=torch.float64)
    cov_b = torch.tensor([[1.0, -0.3], [-0.3, 3.0]], dtype=torch.float64)
    # For 2x2 PSD matrices: tr sqrt(A B) = sqrt(tr(A B) + 2 sqrt(det A det B)).
    tr_sqrt = math.sqrt(float(torch.trace(cov_a @ cov_b)) + 2 * math.sqrt(float(cov_a.det() * cov_b.det())))
    expected = 0.5 ** 2 + 2.0 ** 2 + float(cov_a.trace() + cov_b.trace()) - 2 * tr_sqrt
    a, b = with_exact_stats([0.5, 0.0], cov_a), with_exact_stats([0.0, 2.0], cov_b, seed=3)
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, abs=1e-9)
    assert metrics.frechet_distance(b, a) == pytest.approx(expected, abs=1e-9)


def test_frechet_distance_grows_with_a_shift():
    x = torch.randn(400, 8, dtype=torch.float64)
    values = [metrics.frechet_distance(x, x + s) for s in (0.1, 0.5, 1.0, 2.0)]
    # A shift leaves the covariance alone, so the distance is exactly ||shift||^2 = 8 s^2.
    assert values == pytest.approx([8 * s * s for s in (0.1, 0.5, 1.0, 2.0)], rel=1e-9)
    assert all(v > 0 for v in values) and values == sorted(values)


def test_frechet_distance_handles_rank_deficient_covariances():
    x = torch.randn(50, 64)  # 50 points in 64 dims: singular covariance
    assert metrics.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    assert metrics.frechet_distance(x, torch.randn(50, 64)) > 0


@pytest.mark.parametrize("a, b, message", [
    (torch.randn(10, 3), torch.randn(10, 4), "feature dim"),
    (torch.randn(1, 3), torch.randn(10, 3), "at least 2 rows"),
    (torch.randn(10), torch.randn(10, 3), "2-D"),
    (torch.full((10, 3), float("nan")), torch.randn(10, 3), "NaN"),
])
def test_frechet_distance_rejects_bad_features(a, b, message):
    with pytest.raises(ValueError, match=message):
        metrics.frechet_distance(a, b)


# ----------------------------------------------------------------------------- Inception FID


def test_inception_fid_says_what_is_missing(monkeypatch):
    # None in sys.modules makes the import fail, as on a machine without the packages.
    for name in ("torchmetrics", "torchmetrics.image", "torchmetrics.image.fid", "cleanfid", "cleanfid.fid"):
        monkeypatch.setitem(sys.modules, name, None)
    images = torch.rand(4, 1, 28, 28) * 2 - 1
    with pytest.raises(RuntimeError) as info:
        metrics.inception_fid(images, images)
    message = str(info.value)
    assert "\n" not in message
    assert "torchmetrics" in message and "clean-fid" in message and "pip install" in message


# ----------------------------------------------------------------------------- mode coverage


def test_mode_coverage_of_two_classes():
    out = metrics.mode_coverage(torch.tensor([3] * 50 + [7] * 50))
    assert out["histogram"] == pytest.approx([0, 0, 0, 0.5, 0, 0, 0, 0.5, 0, 0])
    assert out["classes_covered"] == 2
    assert out["kl_to_uniform"] == pytest.approx(math.log(5))


def test_mode_coverage_of_balanced_labels_and_of_logits():
    out = metrics.mode_coverage(torch.arange(100) % 10)
    assert out["classes_covered"] == 10 and out["kl_to_uniform"] == pytest.approx(0.0, abs=1e-12)
    logits = torch.nn.functional.one_hot(torch.tensor([0, 0, 0, 1]), 10).float() * 5
    out = metrics.mode_coverage(logits)
    assert out["histogram"][:2] == [0.75, 0.25] and out["classes_covered"] == 2


def test_mode_coverage_min_share_is_inclusive():
    labels = torch.tensor([0] * 19 + [1])  # class 1 has exactly 5 %
    assert metrics.mode_coverage(labels, min_share=0.05)["classes_covered"] == 2
    assert metrics.mode_coverage(labels, min_share=0.06)["classes_covered"] == 1
    assert metrics.mode_coverage(torch.zeros(7, dtype=torch.long), num_classes=3)["kl_to_uniform"] == \
        pytest.approx(math.log(3))


@pytest.mark.parametrize("bad", [torch.tensor([0, 10]), torch.tensor([-1]), torch.zeros(3, 4),
                                 torch.zeros(0, dtype=torch.long)])
def test_mode_coverage_rejects_bad_labels(bad):
    with pytest.raises(ValueError, match="labels_or_logits"):
        metrics.mode_coverage(bad)


# ----------------------------------------------------------------------------- PRDC


def test_prdc_of_identical_sets_is_one():
    x = torch.randn(300, 8)
    out = metrics.prdc(x, x.clone(), k=5)
    assert out["precision"] == 1.0 and out["recall"] == 1.0 and out["coverage"] == 1.0
    # Each real ball holds its centre and its k - 1 strictly nearer neighbours: density exactly 1.
    assert out["density"] == pytest.approx(1.0)


def test_prdc_of_far_apart_sets_is_zero():
    x = torch.randn(200, 8)
    out = metrics.prdc(x, torch.randn(150, 8) + 100.0, k=3)
    assert out == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_prdc_on_a_hand_computed_case():
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    fake = torch.tensor([[0.5], [10.0], [11.0]])
    # k=1: real radii all 1; fake radii 9.5, 1, 1. Fake 0.5 is in the balls of reals 0 and 1;
    # its 9.5-ball holds every real; reals 0 and 1 have a fake inside their ball, 2 and 3 do not.
    out = metrics.prdc(real, fake, k=1)
    assert out["precision"] == pytest.approx(1 / 3)
    assert out["density"] == pytest.approx(2 / 3)
    assert out["recall"] == 1.0
    assert out["coverage"] == 0.5


def test_prdc_does_not_depend_on_the_block_size(monkeypatch):
    real, fake = torch.randn(120, 4), torch.randn(90, 4) * 1.3
    whole = metrics.prdc(real, fake, k=4)
    monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", 3000)  # ~30 rows per block
    assert metrics.prdc(real, fake, k=4) == whole


def test_prdc_rejects_k_too_large():
    with pytest.raises(ValueError, match="k must be"):
        metrics.prdc(torch.randn(5, 2), torch.randn(10, 2), k=5)


# ----------------------------------------------------------------------------- novelty


def test_novelty_flags_copies_of_training_images(mnist):
    train, test, _ = mnist
    copies = metrics.novelty(train[:300], train, test)
    assert copies["copy_share"] == 1.0
    assert copies["sample_to_train_median"] < 1e-3 < copies["heldout_to_train_median"]
    fresh = metrics.novelty(test[:500], train, test[500:])
    assert fresh["copy_share"] < 0.05
    assert 0.8 < fresh["median_ratio"] < 1.25


def test_novelty_l1_is_mean_absolute_difference():
    train = torch.zeros(3, 1, 2, 2)
    sample = torch.tensor([[[[0.5, -0.5], [1.0, 0.0]]]])
    out = metrics.novelty(sample, train, train + 1.0, metric="l1")
    assert out["sample_to_train_median"] == pytest.approx(0.5)
    assert out["heldout_to_train_median"] == pytest.approx(1.0)
    out = metrics.novelty(sample, train, train + 1.0, metric="l2")
    assert out["sample_to_train_median"] == pytest.approx(math.sqrt(1.5 / 4))


# ----------------------------------------------------------------------------- toy coverage


def test_toy_mode_coverage_of_the_real_mixture_and_of_a_collapsed_one():
    modes = TOY_MODES["8gaussians"]
    full = metrics.toy_mode_coverage(eight_gaussians(4000), modes, radius=0.3)
    assert full["modes_covered"] == 1.0 and full["high_quality"] > 0.98
    collapsed = modes[torch.tensor([0, 3])].repeat(500, 1) + 0.05 * torch.randn(1000, 2)
    out = metrics.toy_mode_coverage(collapsed, modes, radius=0.3)
    assert out["modes_covered"] == 0.25 and out["high_quality"] == 1.0
    assert out["counts"] == [500, 0, 0, 500, 0, 0, 0, 0]
    far = metrics.toy_mode_coverage(torch.full((100, 2), 10.0), modes, radius=0.3)
    assert far["modes_covered"] == 0.0 and far["high_quality"] == 0.0


@pytest.mark.parametrize("name, make", [("moons", two_moons), ("rings", rings)])
def test_toy_curve_coverage_of_the_real_set_of_one_arc_and_of_noise(name, make):
    curve, segment = toy_curve(name)
    assert curve.shape == (2 * 12 * 40, 2) and segment.tolist() == [i // 40 for i in range(2 * 12 * 40)]
    full = metrics.toy_curve_coverage(make(6000), curve, segment, radius=0.15)
    assert full["arcs_covered"] == 1.0 and full["high_quality"] > 0.99  # 3 x the noise holds 99.7%
    assert min(full["counts"]) > 6000 / 24 * 0.7  # equal-share arcs: each close to n / 24
    one_arc = curve[segment == 5].repeat(10, 1)  # every sample on the curve, all on arc 5
    out = metrics.toy_curve_coverage(one_arc, curve, segment, radius=0.15)
    assert out["arcs_covered"] == pytest.approx(1 / 24) and out["high_quality"] == 1.0
    assert out["counts"][5] == len(one_arc)
    noise = metrics.toy_curve_coverage(torch.full((50, 2), 5.0), curve, segment, radius=0.15)
    assert noise["arcs_covered"] == 0.0 and noise["high_quality"] == 0.0
    with pytest.raises(ValueError, match="segment must be an int64"):
        metrics.toy_curve_coverage(one_arc, curve, segment.float(), radius=0.15)


def test_toy_mode_coverage_min_count():
    modes = TOY_MODES["trimodal"]
    samples = torch.tensor([[-2.0]] * 10 + [[0.0]] * 2 + [[2.0]] * 10)
    assert metrics.toy_mode_coverage(samples, modes, 0.5, min_count=3)["modes_covered"] == pytest.approx(2 / 3)
    assert metrics.toy_mode_coverage(samples, modes, 0.5, min_count=2)["modes_covered"] == 1.0


# ----------------------------------------------------------------------------- the digit classifier


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("IGN_FAST_CACHE", str(tmp_path / "a"))
    assert metrics.default_cache_dir() == str(tmp_path / "a")
    monkeypatch.delenv("IGN_FAST_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert metrics.default_cache_dir() == os.path.join(str(tmp_path / "xdg"), "ign_fast")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert metrics.default_cache_dir() == os.path.join(str(tmp_path / "home"), ".cache", "ign_fast")


def test_classifier_trains_to_high_accuracy_and_loads_from_cache(trained_classifier, mnist, monkeypatch):
    classifier, cache, seconds = trained_classifier
    assert seconds < 60
    assert classifier.heldout_accuracy >= 0.95
    _, test, test_labels = mnist
    assert metrics.classifier_accuracy(classifier, test, test_labels) == pytest.approx(classifier.heldout_accuracy)
    stem = f"digit_classifier_v{metrics.CLASSIFIER_VERSION}"
    meta = json.loads((cache / f"{stem}.json").read_text())
    assert meta["heldout_accuracy"] == pytest.approx(classifier.heldout_accuracy)
    assert (cache / f"{stem}.safetensors").stat().st_size > 0
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]

    monkeypatch.setattr(metrics, "train_digit_classifier", lambda *a, **k: pytest.fail("cache was not used"))
    rng = torch.get_rng_state()
    start = time.perf_counter()
    again = metrics.load_digit_classifier(cache_dir=cache)
    assert time.perf_counter() - start < 2.0
    assert torch.equal(torch.get_rng_state(), rng)  # loading draws no random numbers
    assert again.from_cache and not again.training
    assert again.heldout_accuracy == classifier.heldout_accuracy
    for (name, a), (_, b) in zip(classifier.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_eval_with_an_empty_cache_trains_the_classifier_and_reports(cold_eval):
    code, cache, _, report = cold_eval
    assert code == 0
    assert (cache / f"digit_classifier_v{metrics.CLASSIFIER_VERSION}.json").is_file()
    result = json.loads(report.read_text())
    assert result["n"] == 50 and result["classifier_heldout_accuracy"] >= 0.95


def test_classifier_features_and_logits_shapes(trained_classifier, mnist):
    classifier, _, _ = trained_classifier
    x = mnist[1][:7]
    with torch.no_grad():
        assert classifier.features(x).shape == (7, 128)
        assert classifier(x).shape == (7, 10)
    with pytest.raises(ValueError, match="x must be digits"):
        classifier.features(torch.zeros(2, 3, 28, 28))


def test_corrupt_cache_is_retrained_over(tmp_path, monkeypatch):
    calls = []

    def fake_training(device="cpu"):  # a stand-in: the real training is tested once above
        calls.append(device)
        model = metrics.DigitClassifier().eval()
        model.heldout_accuracy, model.train_seconds = 0.5, 0.0
        return model

    monkeypatch.setattr(metrics, "train_digit_classifier", fake_training)
    first = metrics.load_digit_classifier(cache_dir=tmp_path)
    stem = f"digit_classifier_v{metrics.CLASSIFIER_VERSION}"
    weights = tmp_path / f"{stem}.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated weights: hash no longer matches
    second = metrics.load_digit_classifier(cache_dir=tmp_path)
    (tmp_path / f"{stem}.json").write_text("{not json")
    third = metrics.load_digit_classifier(cache_dir=tmp_path)
    assert len(calls) == 3 and not (first.from_cache or second.from_cache or third.from_cache)
    assert metrics.load_digit_classifier(cache_dir=tmp_path).from_cache  # rewritten whole
    metrics.load_digit_classifier(cache_dir=tmp_path, retrain=True)
    assert len(calls) == 4


def test_digit_fid_separates_digits_from_noise(trained_classifier, mnist):
    classifier, _, _ = trained_classifier
    train, test, _ = mnist
    same = metrics.digit_fid(test[:400], test[400:800], classifier)
    other = metrics.digit_fid(train[:400], test[:400], classifier)
    noise = metrics.digit_fid(torch.rand(400, 1, 28, 28) * 2 - 1, test[:400], classifier)
    assert metrics.digit_fid(test[:400], test[:400], classifier) == pytest.approx(0.0, abs=1e-6)
    assert max(same, other) < noise / 10


def test_evaluate_digits_flags_a_generator_that_copies_training_images(trained_classifier, mnist):
    classifier, _, _ = trained_classifier
    train = mnist[0]
    g = torch.Generator().manual_seed(0)

    def copying_generator(n):
        return train[torch.randint(len(train), (n,), generator=g)]

    start = time.perf_counter()
    report = metrics.evaluate_digits(copying_generator, n=2000, classifier=classifier)
    assert time.perf_counter() - start < 20
    assert report["n"] == 2000
    assert report["novelty"]["copy_share"] == 1.0
    assert report["mode_coverage"]["classes_covered"] == 10
    assert report["fid"] < 5 and report["confidence"] > report["heldout_confidence"] - 0.05
    assert report["prdc"]["precision"] > 0.8 and report["prdc"]["recall"] > 0.8
    json.dumps(report)  # plain numbers only


def test_reference_fid_is_what_the_training_digits_themselves_score(trained_classifier, mnist):
    """A "generator" that hands out exactly the 4,000 training digits scores the reference FID: ratio 1."""
    classifier, _, _ = trained_classifier
    train = mnist[0]
    served = []

    def training_digits(n):
        start = sum(served)
        served.append(n)
        return train[start:start + n]

    report = metrics.evaluate_digits(training_digits, n=len(train), classifier=classifier)
    assert len(train) == 4000 and report["reference_fid"] > 0
    assert report["fid"] == pytest.approx(report["reference_fid"], rel=1e-6)
    assert report["fid_over_reference"] == pytest.approx(1.0, rel=1e-6)
    noise = metrics.evaluate_digits(lambda n: torch.rand(n, 1, 28, 28) * 2 - 1, n=500, classifier=classifier)
    assert noise["fid_over_reference"] > 10  # noise is far from digits on the same yardstick


def test_evaluate_digits_rejects_a_wrong_generator(trained_classifier):
    with pytest.raises(ValueError, match="generate_fn"):
        metrics.evaluate_digits(lambda n: torch.zeros(n, 3, 28, 28), n=10, classifier=trained_classifier[0])


# ----------------------------------------------------------------------------- import hygiene


def test_matplotlib_is_not_imported_at_module_level():
    import ign_fast

    root = os.path.dirname(ign_fast.__file__)
    for name in ("metrics.py", "manifold.py", "plots.py"):
        with open(os.path.join(root, name)) as f:
            tree = ast.parse(f.read())
        for node in tree.body:  # top-level statements only; imports inside functions are fine
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("matplotlib") for a in node.names), name
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("matplotlib"), name
