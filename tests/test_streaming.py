"""Images streamed from disk: the same batches as the in-memory loader, exact resume mid-epoch, rank shards,
unreadable files reported and never a shorter epoch, any map-style Dataset."""
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from ign_fast.data import InMemoryLoader, load_image_folder
from ign_fast.streaming import ImageFolderDataset, StreamingLoader, to_model_range


def write_folder(root, n=23, seed=0):
    """n RGB images of mixed sizes and formats (some not square), in two subfolders."""
    rng = np.random.default_rng(seed)
    os.makedirs(root / "a", exist_ok=True)
    os.makedirs(root / "b", exist_ok=True)
    for i in range(n):
        w, h = [(20, 20), (30, 18), (17, 25)][i % 3]
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        ext = ".png" if i % 2 else ".bmp"
        Image.fromarray(pixels).save(root / ("a" if i % 4 else "b") / f"img{i:03d}{ext}")
    return root


def take(loader, n):
    return [loader.next_batch() for _ in range(n)]


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_batches_equal_the_in_memory_loaders(tmp_path, workers):
    root = write_folder(tmp_path)
    dataset = ImageFolderDataset(root, size=16)
    assert len(dataset) == 23 and not dataset.skipped
    memory = InMemoryLoader(load_image_folder(root, size=16), batch_size=5, seed=3)
    stream = StreamingLoader(dataset, batch_size=5, seed=3, num_workers=workers)
    assert stream.batches_per_epoch == memory.batches_per_epoch == 4
    for got, expected in zip(take(stream, 9), take(memory, 9)):  # across two epoch boundaries
        assert got.dtype == torch.uint8 and got.shape == (5, 3, 16, 16)
        assert torch.equal(to_model_range(got), expected)


def test_resume_mid_epoch_is_exact(tmp_path):
    dataset = ImageFolderDataset(write_folder(tmp_path), size=8)
    straight = StreamingLoader(dataset, batch_size=4, seed=1, num_workers=0)
    expected = take(straight, 12)
    first = StreamingLoader(dataset, batch_size=4, seed=1, num_workers=0)
    take(first, 7)  # epoch 1, position 2 (5 batches per epoch)
    state = first.state_dict()
    assert state == {"epoch": 1, "position": 2}
    resumed = StreamingLoader(dataset, batch_size=4, seed=1, num_workers=2)
    resumed.load_state_dict(state)
    for got, want in zip(take(resumed, 5), expected[7:]):
        assert torch.equal(got, want)


def test_rank_shards_make_up_the_global_batch(tmp_path):
    dataset = ImageFolderDataset(write_folder(tmp_path), size=8)
    ranks = [StreamingLoader(dataset, batch_size=3, seed=2, world_size=2, rank=r, num_workers=0) for r in (0, 1)]
    index_ranks = [InMemoryLoader(torch.arange(len(dataset)), batch_size=3, seed=2, world_size=2, rank=r)
                   for r in (0, 1)]
    for _ in range(5):
        for loader, index_loader in zip(ranks, index_ranks):
            indices = index_loader.next_batch()
            expected = torch.stack([dataset[int(i)] for i in indices])
            assert torch.equal(loader.next_batch(), expected)


def test_unreadable_files_are_left_out_and_named(tmp_path):
    root = write_folder(tmp_path, n=6)
    (root / "a" / "broken.png").write_bytes(b"not a png at all")
    (root / "a" / "notes.txt").write_text("ignored: not an image extension")
    dataset = ImageFolderDataset(root, size=8)
    assert len(dataset) == 6 and len(dataset.skipped) == 1
    assert dataset.skipped_summary() == f"skipped 1 unreadable files under {root}: a/broken.png"


def test_a_file_that_fails_to_decode_is_replaced_and_the_epoch_keeps_its_length(tmp_path):
    root = write_folder(tmp_path, n=6)
    good = root / "a" / "img001.png"
    data = good.read_bytes()
    (root / "a" / "img001.png").write_bytes(data[: len(data) // 2])  # valid header, truncated pixels
    dataset = ImageFolderDataset(root, size=8)
    assert len(dataset) == 6  # the header check passes
    loader = StreamingLoader(dataset, batch_size=2, seed=0, num_workers=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = take(loader, loader.batches_per_epoch)
    assert sum(b.shape[0] for b in batches) == 6
    assert any("img001.png: cannot decode" in str(w.message) for w in caught)


def test_an_empty_or_missing_folder_is_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="root must be an existing folder"):
        ImageFolderDataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"found none readable under .* \(1 unreadable\)"):
        ImageFolderDataset(tmp_path / "empty")


class Pairs(torch.utils.data.Dataset):
    """A user's dataset: (float image, label) pairs, one of them poisoned on request."""

    def __init__(self, n=10, bad=None):
        self.n, self.bad = n, bad

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        image = torch.full((1, 4, 4), float(i))
        if i == self.bad:
            image[0, 0, 0] = float("nan")
        return image, i % 3


def test_any_map_style_dataset_of_pairs(tmp_path):
    loader = StreamingLoader(Pairs(), batch_size=4, seed=0, num_workers=0)
    batch = loader.next_batch()
    assert batch.shape == (4, 1, 4, 4) and batch.dtype == torch.float32
    order = InMemoryLoader(torch.arange(10), batch_size=4, seed=0).next_batch()
    assert torch.equal(batch[:, 0, 0, 0], order.float())
    poisoned = StreamingLoader(Pairs(bad=int(order[0])), batch_size=4, seed=0, num_workers=0)
    with pytest.raises(ValueError, match="batch 1 of epoch 0 holds NaN or inf"):
        poisoned.next_batch()


@pytest.mark.parametrize("make, message", [
    (lambda: StreamingLoader([1, 2, 3], 2), "dataset must be a map-style torch.utils.data.Dataset"),
    (lambda: StreamingLoader(Pairs(), 11), r"batch_size \(11\) must be at most the number of samples each process "
                                           r"sees per epoch \(10 of 10\)"),
    (lambda: StreamingLoader(Pairs(), 2, num_workers=-1), "num_workers must be >= 0"),
])
def test_bad_loader_arguments(make, message):
    with pytest.raises((TypeError, ValueError), match=message):
        make()
