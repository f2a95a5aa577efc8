"""Data that does not fit in memory: images decoded from disk on demand, batches served by a DataLoader with
worker processes, in the same seeded, resumable, rank-sharded order as the in-memory loader.

`ImageFolderDataset` lists the files once, checks each file's header (a file that is not an image is left out
and reported: a count and the first names), and decodes an image only when a batch needs it: uint8
[C, size, size], short side resized and center-cropped like `load_image_folder`. What it keeps per file is a
slice of one bytes buffer, not a Python string: worker processes share it without the copy-on-write growth
that a list of strings causes (pytorch/pytorch#13246), so memory does not grow with the number of files
beyond those bytes.

`StreamingLoader` serves any map-style `torch.utils.data.Dataset` whose items are an image tensor or an
(image, label) pair. Epoch e's order is `data.epoch_permutation(len, seed, e, world_size)`, the in-memory
loader's, so a streamed run sees the batches an in-memory run would; its state is (epoch, position), so a
checkpoint records where to resume and resume is exact mid-epoch.
"""
import os
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .data import IMAGE_EXTENSIONS, ShardedEpochs, _check_int, decode_image, list_images

SKIPPED_NAMES_SHOWN = 3


class ImageFolderDataset(Dataset):
    """Every image under root (recursive, sorted by relative path), decoded on demand to uint8 [C, size, size].

    channels: 1 (grayscale) or 3 (RGB). check_headers: open each file's header once at construction (about
    0.1 ms a file) and leave out files that are not readable images, listed in `skipped`. A file that passes
    the header check but fails to decode later (a truncated file) is replaced by the next readable file in
    the listing, with a warning naming it, so an epoch never ends early and never stops mid-way.
    """

    def __init__(self, root, size=64, channels=3, check_headers=True):
        root = os.fspath(root)
        self.size = _check_int("size", size, 1)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        if not os.path.isdir(root):
            raise FileNotFoundError(f"root must be an existing folder, got {root!r}")
        self.root, self.channels, self.mode = root, channels, "L" if channels == 1 else "RGB"
        paths = list_images(root)
        self.skipped = []
        if check_headers:
            from PIL import Image

            readable = []
            for path in paths:
                try:
                    with Image.open(path):
                        pass
                    readable.append(path)
                except Exception:  # PIL raises several types for a bad file; any of them means "not an image"
                    self.skipped.append(path)
            paths = readable
        if not paths:
            what = f" ({len(self.skipped)} unreadable)" if self.skipped else ""
            raise ValueError(f"root must hold {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} images, found none "
                             f"readable under {root}{what}")
        encoded = [p.encode("utf-8", "surrogateescape") for p in paths]
        self._offsets = np.cumsum([0] + [len(e) for e in encoded], dtype=np.int64)
        self._blob = b"".join(encoded)

    def skipped_summary(self):
        """One line about the files left out, or "" when none were."""
        if not self.skipped:
            return ""
        names = ", ".join(os.path.relpath(p, self.root) for p in self.skipped[:SKIPPED_NAMES_SHOWN])
        more = f" and {len(self.skipped) - SKIPPED_NAMES_SHOWN} more" if len(self.skipped) > SKIPPED_NAMES_SHOWN else ""
        return f"skipped {len(self.skipped)} unreadable files under {self.root}: {names}{more}"

    def __len__(self):
        return len(self._offsets) - 1

    def path(self, index):
        start, end = self._offsets[index], self._offsets[index + 1]
        return self._blob[start:end].decode("utf-8", "surrogateescape")

    def __getitem__(self, index):
        n = len(self)
        for tries in range(n):
            path = self.path((index + tries) % n)
            try:
                pixels = decode_image(path, self.size, self.mode)
                return torch.from_numpy(np.array(pixels)).permute(2, 0, 1).contiguous()  # PIL arrays are read-only
            except OSError as error:
                warnings.warn(f"ign_fast: {path}: cannot decode ({error}); using the next image instead",
                              RuntimeWarning, stacklevel=2)
        raise ValueError(f"no image under {self.root} could be decoded")


def to_model_range(images):
    """uint8 pixels (0..255) -> float32 in [-1, 1] (the DCGAN/U-Net tanh range); float tensors unchanged.
    Applied after the batch reaches the device, so the copy moves a quarter of the bytes."""
    if images.dtype == torch.uint8:
        return images.float().div_(127.5).sub_(1.0)
    return images


def _images_of(batch):
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError(f"dataset items must be an image tensor or an (image, label) pair, got a batch of "
                    f"{type(batch).__name__}")


class StreamingLoader(ShardedEpochs):
    """Endless, seeded, resumable, rank-sharded batches of images from a map-style Dataset, loaded by
    `num_workers` processes. The interface of data.InMemoryLoader (the same ShardedEpochs schedule):
    next_batch(), state_dict(), load_state_dict(), batches_per_epoch. Batches are the dataset's dtype (uint8
    for ImageFolderDataset: see to_model_range); float batches are checked for NaN/inf here, on the CPU,
    instead of in the step. with_labels: batches are (images, int64 labels), for a class-conditional run; the
    dataset's items must then be (image, label) pairs."""

    def __init__(self, dataset, batch_size, seed=0, drop_last=True, rank=0, world_size=1, num_workers=2,
                 prefetch_factor=4, with_labels=False):
        if not isinstance(dataset, Dataset) or not hasattr(dataset, "__len__"):
            raise TypeError(f"dataset must be a map-style torch.utils.data.Dataset (with __len__), got "
                            f"{type(dataset).__name__}")
        self.dataset = dataset
        self.num_workers = _check_int("num_workers", num_workers, 0)
        self.prefetch_factor = _check_int("prefetch_factor", prefetch_factor, 1)
        if not isinstance(with_labels, bool):
            raise TypeError(f"with_labels must be a bool, got {type(with_labels).__name__}")
        self.with_labels = with_labels
        self._init_schedule(len(dataset), batch_size, seed, drop_last, rank, world_size)
        self._iterator = None

    def _start(self):
        order = self.shard_of(self.epoch)[self.position * self.batch_size:self.batches_per_epoch * self.batch_size]
        order = order.tolist()
        workers = self.num_workers if len(order) > self.batch_size else 0  # a last batch needs no pool
        loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=order, num_workers=workers,
                            drop_last=False, prefetch_factor=self.prefetch_factor if workers else None,
                            persistent_workers=False)
        self._iterator = iter(loader)

    def next_batch(self):
        if self._advance():
            self._iterator = None
        if self._iterator is None:
            self._start()
        batch = next(self._iterator)
        images = _images_of(batch)
        self.position += 1
        if images.is_floating_point() and not bool(torch.isfinite(images).all()):
            raise ValueError(f"dataset batch {self.position} of epoch {self.epoch} holds NaN or inf")
        if self.with_labels:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2 or not isinstance(batch[1], torch.Tensor):
                raise ValueError("dataset items must be (image, label) pairs for a class-conditional run, got "
                                 "images alone")
            return images, batch[1].to(torch.int64)
        return images

    def __iter__(self):
        while True:
            yield self.next_batch()

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self._iterator = None  # the next batch starts a loader at the restored position
