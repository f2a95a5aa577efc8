"""Image grids and PNG files without matplotlib: the trainer and CLI write these on any install."""
import math
import os

import numpy as np
import torch


def make_grid(images, nrow=None, padding=2, pad_value=1.0):
    """[N, C, H, W] images in [-1, 1] -> one [C, H', W'] grid image in [-1, 1], nrow images per row."""
    if images.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    rows = int(math.ceil(n / nrow))
    grid = torch.full((c, rows * (h + padding) + padding, nrow * (w + padding) + padding), pad_value)
    for k in range(n):
        r, col = divmod(k, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top:top + h, left:left + w] = images[k].detach().float().cpu()
    return grid


def hstack_grids(grids, gap=6, pad_value=1.0):
    """Grids of equal height side by side, separated by a gap."""
    height = max(g.shape[1] for g in grids)
    parts = []
    for k, g in enumerate(grids):
        if g.shape[1] < height:
            g = torch.cat([g, torch.full((g.shape[0], height - g.shape[1], g.shape[2]), pad_value)], dim=1)
        parts.append(g)
        if k + 1 < len(grids):
            parts.append(torch.full((g.shape[0], height, gap), pad_value))
    return torch.cat(parts, dim=2)


def save_png(image, path):
    """A [C, H, W] image in [-1, 1] (C = 1 or 3) as a PNG file; parent folders are created."""
    from PIL import Image

    array = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    array = array.permute(1, 2, 0).numpy()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    mode = "L" if array.shape[2] == 1 else "RGB"
    Image.fromarray(np.ascontiguousarray(array[:, :, 0] if mode == "L" else array), mode=mode).save(path)
    return path


def save_grid(images, path, nrow=None):
    return save_png(make_grid(images, nrow), path)


def load_png(path, size=None, channels=1):
    """A PNG/JPEG file as a [1, C, H, W] tensor in [-1, 1], optionally resized to size×size."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("L" if channels == 1 else "RGB")
        if size is not None:
            img = img.resize((size, size), Image.BICUBIC)
        array = np.asarray(img, dtype=np.float32)
    t = torch.from_numpy(array.copy())
    t = t.unsqueeze(0) if channels == 1 else t.permute(2, 0, 1)
    return (t / 127.5 - 1.0).unsqueeze(0)
