import gzip
import math
import struct

import numpy as np
import pytest
import torch

from ign_fast.data import (
    DATASET_NAMES,
    TOY_MODES,
    InMemoryLoader,
    eight_gaussians,
    class_colors,
    load_dataset,
    load_image_folder,
    load_mnist5k,
    load_mnist5k_color,
    load_mnist_idx,
    read_idx,
    rings,
    trimodal_1d,
    two_moons,
)

from conftest import devices

# ----------------------------------------------------------------------------- MNIST-5k


def test_mnist5k_shapes_range_and_class_balance():
    images, labels = load_mnist5k("all")
    assert images.shape == (5000, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (5000,) and labels.dtype == torch.int64
    assert images.min() == -1 and images.max() == 1
    assert torch.bincount(labels).tolist() == [500] * 10


def test_mnist5k_splits_are_disjoint_deterministic_and_shuffled():
    train_x, train_y = load_mnist5k("train", holdout=1000, seed=0)
    test_x, test_y = load_mnist5k("test", holdout=1000, seed=0)
    assert len(train_x) == 4000 and len(test_x) == 1000
    # Disjoint: no test image equals a train image (MNIST-5k has no exact duplicates).
    train_keys = {row.numpy().tobytes() for row in train_x.flatten(1)}
    assert not any(row.numpy().tobytes() in train_keys for row in test_x.flatten(1))
    again_x, again_y = load_mnist5k("train", holdout=1000, seed=0)
    assert torch.equal(again_x, train_x) and torch.equal(again_y, train_y)
    # Shuffled: the label-sorted source order is gone, every class is in the test split.
    assert len(set(test_y.tolist())) == 10
    other_x, _ = load_mnist5k("train", holdout=1000, seed=1)
    assert not torch.equal(other_x, train_x)


def test_mnist5k_color_is_each_digit_in_its_class_hue():
    colors = class_colors()
    assert colors.shape == (10, 3) and colors.min() == 0 and colors.max() == 1
    assert len({tuple(c.tolist()) for c in colors}) == 10  # ten distinct hues
    assert bool((colors.max(1).values == 1).all())  # fully saturated, full value
    gray, gray_labels = load_mnist5k("test")
    rgb, labels = load_mnist5k_color("test")
    assert rgb.shape == (1000, 3, 28, 28) and torch.equal(labels, gray_labels)
    assert rgb.min() >= -1 and rgb.max() <= 1
    ink = (gray + 1) / 2
    torch.testing.assert_close((rgb + 1) / 2, ink * colors[labels].view(-1, 3, 1, 1), rtol=0, atol=1e-6)
    assert bool((rgb[(gray == -1).expand_as(rgb)] == -1).all())  # black background
    train, _ = load_dataset("mnist5k-color", n=5)
    assert train.shape == (5, 3, 28, 28)
    with pytest.raises(ValueError, match="size must be None or 28"):
        load_dataset("mnist5k-color", size=32)


def test_mnist5k_returns_copies_not_the_cache():
    images, _ = load_mnist5k("all")
    images.fill_(0)
    assert load_mnist5k("all")[0].min() == -1


def test_mnist5k_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        load_mnist5k("val")
    with pytest.raises(ValueError, match="holdout"):
        load_mnist5k(holdout=5001)
    with pytest.raises(ValueError, match="empty"):
        load_mnist5k("test", holdout=0)


# ----------------------------------------------------------------------------- IDX files


def idx_bytes(array, code=0x08, fmt=">B"):
    header = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(fmt).tobytes()


def write_mnist_folder(folder, prefix, n, gz, rng):
    images = rng.integers(0, 256, size=(n, 6, 5), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    suffix = ".gz" if gz else ""
    for stem, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        data = idx_bytes(array)
        (folder / (stem + suffix)).write_bytes(gzip.compress(data) if gz else data)
    return images, labels


@pytest.mark.parametrize("code,fmt", [(0x08, ">u1"), (0x09, ">i1"), (0x0B, ">i2"), (0x0C, ">i4"),
                                      (0x0D, ">f4"), (0x0E, ">f8")])
def test_read_idx_round_trip_all_dtypes(tmp_path, code, fmt):
    array = (np.arange(24).reshape(2, 3, 4) - 7).astype(fmt)
    if fmt.endswith("u1"):
        array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "x.idx"
    path.write_bytes(idx_bytes(array, code, fmt))
    back = read_idx(path)
    assert back.shape == (2, 3, 4) and back.dtype.isnative
    np.testing.assert_array_equal(back, array)


def test_read_idx_gzip_detected_by_content(tmp_path):
    array = np.arange(10, dtype=np.uint8)
    (tmp_path / "a.gz").write_bytes(gzip.compress(idx_bytes(array)))
    (tmp_path / "b").write_bytes(gzip.compress(idx_bytes(array)))  # gzip without the suffix
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), array)
    np.testing.assert_array_equal(read_idx(str(tmp_path / "b")), array)


def test_read_idx_corrupt_files_raise_naming_the_file(tmp_path):
    good = idx_bytes(np.zeros((3, 4, 4), dtype=np.uint8))
    cases = {
        "truncated_data": good[:-1],
        "trailing": good + b"\0",
        "truncated_header": good[:9],
        "tiny": good[:2],
        "bad_magic": b"\1" + good[1:],
        "bad_dtype": good[:2] + b"\x07" + good[3:],
        "bad_gzip": gzip.compress(good)[:-6],
    }
    messages = {"truncated_data": "truncated", "trailing": "trailing", "truncated_header": "header",
                "tiny": "header", "bad_magic": "magic", "bad_dtype": "dtype code", "bad_gzip": "gzip"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=messages[name]) as info:
            read_idx(tmp_path / name)
        assert name in str(info.value)


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_idx_splits(tmp_path, gz):
    rng = np.random.default_rng(0)
    train = write_mnist_folder(tmp_path, "train", 7, gz, rng)
    test = write_mnist_folder(tmp_path, "t10k", 3, gz, rng)
    for split, (raw_images, raw_labels) in (("train", train), ("test", test)):
        images, labels = load_mnist_idx(tmp_path, split)
        assert images.shape == (len(raw_labels), 1, 6, 5) and images.dtype == torch.float32
        torch.testing.assert_close(images[:, 0], torch.from_numpy(raw_images).float() / 127.5 - 1)
        assert labels.dtype == torch.int64 and labels.tolist() == raw_labels.tolist()
    images, labels = load_mnist_idx(tmp_path, "all")
    assert images.shape[0] == labels.shape[0] == 10
    images, labels = load_dataset("mnist", root=tmp_path, split="test")
    assert images.shape == (3, 1, 6, 5)


def test_load_mnist_idx_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="root"):
        load_mnist_idx(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_mnist_idx(tmp_path)
    write_mnist_folder(tmp_path, "train", 4, False, np.random.default_rng(0))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(5, dtype=np.uint8)))
    with pytest.raises(ValueError, match="5 labels for 4 images"):
        load_mnist_idx(tmp_path)


# ----------------------------------------------------------------------------- image folders


def test_load_image_folder_resizes_short_side_and_center_crops(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    # Wide 16x64 -> 8x32, crop keeps source columns 24..40: inside the white band 16..48 with a
    # margin for the bicubic kernel, while a squash or corner crop would pull in the black sides.
    wide = np.zeros((16, 64, 3), dtype=np.uint8)
    wide[:, 16:48] = 255
    Image.fromarray(wide).save(tmp_path / "a_wide.png")
    # Tall 80x20 -> 32x8, crop keeps source rows 30..50 inside the red band 20..60.
    tall = np.zeros((80, 20, 3), dtype=np.uint8)
    tall[20:60, :, 0] = 255
    (tmp_path / "sub").mkdir()
    Image.fromarray(tall).save(tmp_path / "sub" / "b_tall.png")
    Image.fromarray(np.full((5, 5), 128, dtype=np.uint8)).save(tmp_path / "c_gray.bmp")
    (tmp_path / "notes.txt").write_text("not an image")

    images = load_image_folder(tmp_path, size=8, channels=3)
    assert images.shape == (3, 3, 8, 8) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    # Sorted by relative path: a_wide.png, c_gray.bmp, sub/b_tall.png.
    assert torch.allclose(images[0], torch.ones(3, 8, 8), atol=0.02)
    assert torch.allclose(images[1], torch.full((3, 8, 8), 128 / 127.5 - 1), atol=0.02)
    assert torch.allclose(images[2][0], torch.ones(8, 8), atol=0.02)
    assert torch.allclose(images[2][1:], -torch.ones(2, 8, 8), atol=0.02)

    gray = load_image_folder(tmp_path, size=4, channels=1)
    assert gray.shape == (3, 1, 4, 4)
    assert load_dataset("images", root=tmp_path, size=4, n=2)[0].shape == (2, 3, 4, 4)


def test_load_image_folder_errors(tmp_path):
    pytest.importorskip("PIL.Image")
    with pytest.raises(ValueError, match="no png/jpg/jpeg/bmp/webp images"):
        load_image_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="root"):
        load_image_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="channels"):
        load_image_folder(tmp_path, channels=2)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        load_image_folder(tmp_path)


# ----------------------------------------------------------------------------- toy sets


@pytest.mark.parametrize("make,dim", [(trimodal_1d, 1), (eight_gaussians, 2), (two_moons, 2), (rings, 2)])
def test_toy_shapes_and_determinism(make, dim):
    x = make(500, seed=3)
    assert x.shape == (500, dim) and x.dtype == torch.float32
    assert torch.equal(x, make(500, seed=3))
    assert not torch.equal(x, make(500, seed=4))


@pytest.mark.parametrize("name,make,std", [("trimodal", trimodal_1d, 0.2), ("8gaussians", eight_gaussians, 0.1)])
def test_toy_modes_are_covered_evenly(name, make, std):
    modes = TOY_MODES[name]
    x = make(8000)
    dist = torch.cdist(x, modes)
    nearest = dist.argmin(1)
    counts = torch.bincount(nearest, minlength=len(modes)).float()
    expected = len(x) / len(modes)
    # Multinomial counts: std ~ sqrt(expected); 5 sigma.
    assert (counts - expected).abs().max() < 5 * math.sqrt(expected)
    # Distance to the own centre is within a few component stds.
    assert dist.min(1).values.max() < 6 * std * math.sqrt(x.shape[1])


def test_moons_and_rings_geometry():
    radius = rings(4000).norm(dim=1)
    assert ((radius - 1).abs() < 0.3).float().mean().item() == pytest.approx(0.5, abs=0.05)
    assert ((radius - 2).abs() < 0.3).float().mean().item() == pytest.approx(0.5, abs=0.05)
    moons = two_moons(4000)
    assert moons.mean(0).abs().max() < 0.1  # centred
    assert moons[:, 0].min() > -1.8 and moons[:, 0].max() < 2.8


def test_load_dataset_toys_and_validation():
    assert set(DATASET_NAMES) == {"mnist5k", "mnist5k-color", "mnist", "images", "trimodal", "8gaussians", "moons",
                                  "rings"}
    train, labels = load_dataset("8gaussians", n=100)
    assert train.shape == (100, 2) and labels is None
    test, _ = load_dataset("8gaussians", split="test", n=100)
    assert not torch.equal(train, test)
    assert load_dataset("moons")[0].shape == (10_000, 2)
    images, labels = load_dataset("mnist5k", split="test", n=10)
    assert images.shape == (10, 1, 28, 28) and labels.shape == (10,)
    with pytest.raises(ValueError, match="name must be one of"):
        load_dataset("cifar")
    with pytest.raises(ValueError, match="root must be given"):
        load_dataset("images")
    with pytest.raises(ValueError, match="root is not used"):
        load_dataset("rings", root="/tmp")
    with pytest.raises(ValueError, match="size"):
        load_dataset("mnist5k", size=64)
    with pytest.raises(ValueError, match="split"):
        load_dataset("rings", split="all")
    with pytest.raises(ValueError, match="n must be"):
        load_dataset("rings", n=0)
    with pytest.raises(TypeError, match="seed"):
        trimodal_1d(10, seed=1.5)


# ----------------------------------------------------------------------------- InMemoryLoader


def take(loader, k):
    return [loader.next_batch() for _ in range(k)]


def test_loader_is_deterministic_and_reshuffles_each_epoch():
    data = torch.arange(20)
    a, b = InMemoryLoader(data, 5, seed=1), InMemoryLoader(data, 5, seed=1)
    batches_a, batches_b = take(a, 8), take(b, 8)
    assert all(torch.equal(x, y) for x, y in zip(batches_a, batches_b))
    epoch0, epoch1 = torch.cat(batches_a[:4]), torch.cat(batches_a[4:])
    assert sorted(epoch0.tolist()) == list(range(20)) == sorted(epoch1.tolist())
    assert not torch.equal(epoch0, epoch1)
    assert not torch.equal(epoch0, torch.cat(take(InMemoryLoader(data, 5, seed=2), 4)))
    assert a.state_dict() == {"epoch": 1, "position": 4}


def test_loader_drop_last_and_iter():
    data = torch.arange(11)
    dropped = take(InMemoryLoader(data, 4), 3)
    assert [len(b) for b in dropped] == [4, 4, 4]  # 2 per epoch, third starts epoch 1
    kept = InMemoryLoader(data, 4, drop_last=False)
    assert [len(b) for b in take(kept, 4)] == [4, 4, 3, 4]
    it = iter(InMemoryLoader(data, 4))
    assert torch.equal(next(it), dropped[0])


def test_loader_state_round_trip_resumes_exactly():
    data = torch.randn(23, 3)
    run = InMemoryLoader(data, 4, seed=7)
    take(run, 7)
    state = run.state_dict()
    expected = take(run, 5)
    resumed = InMemoryLoader(data, 4, seed=7)
    resumed.load_state_dict(dict(state))
    assert all(torch.equal(x, y) for x, y in zip(take(resumed, 5), expected))
    with pytest.raises(ValueError, match="state"):
        resumed.load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match="position"):
        resumed.load_state_dict({"epoch": 0, "position": 99})


def test_loader_tuple_data_keeps_pairs_together():
    x = torch.arange(10).float()
    loader = InMemoryLoader((x, x.long() * 10), 3)
    xb, yb = loader.next_batch()
    assert torch.equal(xb.long() * 10, yb)


@pytest.mark.parametrize("n,world", [(20, 4), (22, 4), (3, 5)])
def test_loader_rank_shards_are_disjoint_and_cover(n, world):
    data = torch.arange(n)
    shard = math.ceil(n / world)
    per_rank = [torch.cat(take(InMemoryLoader(data, 1, seed=5, rank=r, world_size=world), shard)).tolist()
                for r in range(world)]
    assert all(len(p) == shard for p in per_rank)
    everything = sum(per_rank, [])
    assert set(everything) == set(range(n))
    if n % world == 0:
        assert sorted(everything) == list(range(n))  # no padding: exact partition
    else:
        assert len(everything) - n == shard * world - n  # only the padding repeats


def test_loader_bad_arguments():
    data = torch.arange(10)
    with pytest.raises(ValueError, match=r"batch_size \(6\) must be at most the number of samples each process "
                                         r"sees per epoch \(5 of 10\)"):
        InMemoryLoader(data, 6, world_size=2)
    InMemoryLoader(data, 6, world_size=2, drop_last=False)
    with pytest.raises(ValueError, match="rank"):
        InMemoryLoader(data, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        InMemoryLoader(data, 0)
    with pytest.raises(TypeError, match="data"):
        InMemoryLoader([1, 2, 3], 1)
    with pytest.raises(ValueError, match="first dim"):
        InMemoryLoader((torch.zeros(3), torch.zeros(4)), 1)


@pytest.mark.parametrize("device", devices())
def test_loader_batches_stay_on_the_data_device(device):
    data = torch.arange(12, device=device)
    on_device = take(InMemoryLoader(data, 4, seed=3), 4)
    on_cpu = take(InMemoryLoader(data.cpu(), 4, seed=3), 4)
    assert all(b.device == data.device and torch.equal(b.cpu(), c) for b, c in zip(on_device, on_cpu))
