"""Image grids and PNG files with pillow only: the trainer and CLI write these on any install."""
import contextlib
import math
import os
import tempfile

import numpy as np
import torch

from .validation import check_finite, check_positive_int, check_tensor


def _prepare_path(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    return path


def replace_atomically(path: str, write) -> str:
    """Call write(tmp_path) then move it over ``path``, so a viewer never sees a half-written file."""
    path = _prepare_path(path)
    suffix = os.path.splitext(path)[1] or ".png"
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; an image is an ordinary readable file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return path


def image_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: float = -1.0) -> np.ndarray:
    """Tile [N, C, H, W] images in [-1, 1] (C = 1 or 3) into one uint8 [H', W', C] array.

    ``nrow`` images per row, ceil(N / nrow) rows, ``padding`` px around and between tiles filled with
    ``pad_value`` (-1 = black, as torchvision's make_grid): (rows * (H + p) + p) x (cols * (W + p) + p).
    Values outside [-1, 1] are clipped.
    """
    check_tensor("images", images)
    if images.dim() != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(f"images must be [N >= 1, 1 or 3, H, W], got shape {tuple(images.shape)}")
    check_finite("images", images)
    nrow = check_positive_int("nrow", nrow)
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be an int >= 0, got {padding!r}")
    n, c, h, w = images.shape
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    pixels = ((images.detach().to("cpu", torch.float32).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    fill = int(round((min(max(float(pad_value), -1.0), 1.0) + 1) * 127.5))
    grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, c), fill, dtype=np.uint8)
    tiles = pixels.permute(0, 2, 3, 1).numpy()
    for i in range(n):
        top = padding + (i // cols) * (h + padding)
        left = padding + (i % cols) * (w + padding)
        grid[top:top + h, left:left + w] = tiles[i]
    return grid


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int = 8, padding: int = 2,
                    pad_value: float = -1.0) -> str:
    """Write ``image_grid(images, nrow, padding, pad_value)`` as a PNG (grayscale for 1 channel) to
    ``path``, creating its folder; pillow only. Returns the path."""
    from PIL import Image

    grid = image_grid(images, nrow, padding, pad_value)
    picture = Image.fromarray(grid[..., 0] if grid.shape[2] == 1 else grid)
    return replace_atomically(path, lambda tmp: picture.save(tmp, format="PNG"))


def hstack(grids, gap=6, fill=255):
    """uint8 [H, W, C] arrays side by side (padded to the tallest), separated by a gap."""
    height = max(g.shape[0] for g in grids)
    parts = []
    for k, g in enumerate(grids):
        if g.shape[0] < height:
            g = np.concatenate([g, np.full((height - g.shape[0], *g.shape[1:]), fill, np.uint8)])
        parts.append(g)
        if k + 1 < len(grids):
            parts.append(np.full((height, gap, g.shape[2]), fill, np.uint8))
    return np.concatenate(parts, axis=1)


def vstack(grids, gap=6, fill=255):
    """uint8 [H, W, C] arrays of equal width stacked top to bottom, separated by a gap."""
    return np.swapaxes(hstack([np.swapaxes(g, 0, 1) for g in grids], gap, fill), 0, 1)


def save_array_png(array, path):
    """A uint8 [H, W, C] array as a PNG file, written atomically."""
    from PIL import Image

    picture = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
    return replace_atomically(os.fspath(path), lambda tmp: picture.save(tmp, format="PNG"))


def save_png(image, path):
    """One [C, H, W] image in [-1, 1] as a PNG file."""
    return save_image_grid(image.unsqueeze(0), path, nrow=1, padding=0)


def load_png(path, size=None, channels=1):
    """A PNG/JPEG file as a [1, C, H, W] tensor in [-1, 1]. With size: the short side resized to size, then
    center-cropped to size x size, as the trainer prepares a folder of images (data.load_image_folder), so a
    non-square picture is not squashed. ValueError naming the file when pillow cannot read it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            if size is not None:
                from .data import resize_center_crop

                img = resize_center_crop(img, size)
            array = np.asarray(img, dtype=np.float32)
    except UnidentifiedImageError:
        raise ValueError(f"{os.fspath(path)!r} is not an image file pillow can read (PNG, JPEG, ...)") from None
    except FileNotFoundError:
        raise ValueError(f"{os.fspath(path)!r} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{os.fspath(path)!r} is a folder, not an image file") from None
    except (OSError, SyntaxError) as error:  # truncated or damaged files; pillow raises SyntaxError for some
        raise ValueError(f"{os.fspath(path)!r} cannot be read as an image ({error})") from None
    t = torch.from_numpy(array.copy())
    t = t.unsqueeze(0) if channels == 1 else t.permute(2, 0, 1)
    return (t / 127.5 - 1.0).unsqueeze(0)


def border_mean(images):
    """Mean value of the outer eighth (at least one pixel) of each [C, H, W] image in a batch -> [B]: the
    background's brightness, -1 for white-on-black digits, near 1 for dark strokes on white paper."""
    h, w = images.shape[-2:]
    band = max(1, min(h, w) // 8)
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[:band], mask[-band:], mask[:, :band], mask[:, -band:] = True, True, True, True
    return images.float()[..., mask].flatten(1).mean(1)
