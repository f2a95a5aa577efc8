"""Networks for IGN: DCGAN-style autoencoders and a U-Net for images, an MLP for toy data.

Every model keeps its constructor arguments in ``self.config`` (JSON-able,
including ``"name"``) so a checkpoint can rebuild it with ``build_model(**config)``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

NORM_NAMES = ("batch", "group", "none")


def _check_positive_int(name: str, value: Any) -> int:
    # bool is an int subclass; True as a width is always a bug.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _check_norm(norm: Any) -> str:
    if norm not in NORM_NAMES:
        raise ValueError(f"norm must be one of {list(NORM_NAMES)}, got {norm!r}")
    return norm


def group_norm_groups(channels: int) -> int:
    """Largest divisor of ``channels`` not above min(32, channels // 4) (at least 1)."""
    target = max(1, min(32, channels // 4))
    for groups in range(target, 0, -1):
        if channels % groups == 0:
            return groups
    return 1


def make_norm(norm: str, channels: int) -> nn.Module:
    """BatchNorm2d, GroupNorm or Identity for a feature map with ``channels`` channels."""
    norm = _check_norm(norm)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(group_norm_groups(channels), channels)
    return nn.Identity()


def init_dcgan_weights(module: nn.Module) -> nn.Module:
    """DCGAN init in place: conv/linear weights N(0, 0.02), norm weights N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            if m.weight is not None:
                nn.init.normal_(m.weight, 1.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


def _out_channels_entry(in_channels: int, out_channels: int) -> dict:
    """{"out_channels": n} only where it differs from in_channels (a class-conditional model takes the label
    planes as extra input channels and returns the image's: ign_fast.conditional), so the records of every
    other model, and the checkpoints that hold them, stay as they were."""
    return {} if out_channels == in_channels else {"out_channels": out_channels}


class _AutoEncoder(nn.Module):
    """Shared forward/shape check for the image autoencoders."""

    config: dict
    encoder: nn.Sequential
    decoder: nn.Sequential

    def input_shape(self) -> tuple[int, ...]:
        return expected_input_shape(self)

    def _check_input(self, x: torch.Tensor) -> None:
        expected = self.input_shape()
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"{self.config['name']} expects input [B, {', '.join(map(str, expected))}], "
                f"got {list(x.shape)}"
            )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self.decoder(self.encoder(x))


class DCGAN28(_AutoEncoder):
    """DCGAN autoencoder for 28x28 images (IGN's MNIST model): 28 -> 14 -> 7 -> 1x1 latent and back."""

    def __init__(self, in_channels: int = 1, latent_dim: int = 64, width: int = 64, norm: str = "batch",
                 out_channels: int | None = None):
        super().__init__()
        c = _check_positive_int("in_channels", in_channels)
        out_c = c if out_channels is None else _check_positive_int("out_channels", out_channels)
        z = _check_positive_int("latent_dim", latent_dim)
        w = _check_positive_int("width", width)
        norm = _check_norm(norm)
        self.config = {"name": "dcgan28", "in_channels": c, "latent_dim": z, "width": w, "norm": norm,
                       **_out_channels_entry(c, out_c)}
        # No norm on the first encoder layer, as in DCGAN discriminators.
        self.encoder = nn.Sequential(
            nn.Conv2d(c, w, 4, 2, 1),  # 14x14
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(w, 2 * w, 4, 2, 1),  # 7x7
            make_norm(norm, 2 * w),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(2 * w, z, 7, 1, 0),  # 1x1
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(z, 2 * w, 7, 1, 0),  # 7x7
            make_norm(norm, 2 * w),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(2 * w, w, 4, 2, 1),  # 14x14
            make_norm(norm, w),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(w, out_c, 4, 2, 1),  # 28x28
            nn.Tanh(),
        )
        init_dcgan_weights(self)


class DCGAN64(_AutoEncoder):
    """DCGAN autoencoder for 64x64 images: 64 -> 32 -> 16 -> 8 -> 4 -> 1x1 latent and back."""

    def __init__(self, in_channels: int = 3, latent_dim: int = 128, width: int = 64, norm: str = "batch",
                 out_channels: int | None = None):
        super().__init__()
        c = _check_positive_int("in_channels", in_channels)
        out_c = c if out_channels is None else _check_positive_int("out_channels", out_channels)
        z = _check_positive_int("latent_dim", latent_dim)
        w = _check_positive_int("width", width)
        norm = _check_norm(norm)
        self.config = {"name": "dcgan64", "in_channels": c, "latent_dim": z, "width": w, "norm": norm,
                       **_out_channels_entry(c, out_c)}
        self.encoder = nn.Sequential(
            nn.Conv2d(c, w, 4, 2, 1),  # 32x32
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(w, 2 * w, 4, 2, 1),  # 16x16
            make_norm(norm, 2 * w),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(2 * w, 4 * w, 4, 2, 1),  # 8x8
            make_norm(norm, 4 * w),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(4 * w, 8 * w, 4, 2, 1),  # 4x4
            make_norm(norm, 8 * w),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(8 * w, z, 4, 1, 0),  # 1x1
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(z, 8 * w, 4, 1, 0),  # 4x4
            make_norm(norm, 8 * w),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(8 * w, 4 * w, 4, 2, 1),  # 8x8
            make_norm(norm, 4 * w),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(4 * w, 2 * w, 4, 2, 1),  # 16x16
            make_norm(norm, 2 * w),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(2 * w, w, 4, 2, 1),  # 32x32
            make_norm(norm, w),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(w, out_c, 4, 2, 1),  # 64x64
            nn.Tanh(),
        )
        init_dcgan_weights(self)


class MLP(nn.Module):
    """[B, dim] -> [B, dim] MLP for toy data: ``depth`` hidden SiLU layers, linear output.

    The output is not squashed because toy data is not confined to [-1, 1].
    PyTorch's default init is kept: N(0, 0.02) weights would shrink the signal
    by ~0.3x per 256-wide layer and start the toy runs from a collapsed map.
    """

    def __init__(self, dim: int, hidden: int = 256, depth: int = 3):
        super().__init__()
        dim = _check_positive_int("dim", dim)
        hidden = _check_positive_int("hidden", hidden)
        depth = _check_positive_int("depth", depth)
        self.config = {"name": "mlp", "dim": dim, "hidden": hidden, "depth": depth}
        layers: list[nn.Module] = []
        width_in = dim
        for _ in range(depth):
            layers += [nn.Linear(width_in, hidden), nn.SiLU()]
            width_in = hidden
        layers.append(nn.Linear(hidden, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = self.config["dim"]
        if x.dim() != 2 or x.shape[1] != dim:
            raise ValueError(f"mlp expects input [B, {dim}], got {list(x.shape)}")
        return self.net(x)


class _ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, plus the input (through a 1x1 conv where the channel count changes)."""

    def __init__(self, channels_in: int, channels_out: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(group_norm_groups(channels_in), channels_in), nn.SiLU(),
            nn.Conv2d(channels_in, channels_out, 3, padding=1),
            nn.GroupNorm(group_norm_groups(channels_out), channels_out), nn.SiLU(),
            nn.Conv2d(channels_out, channels_out, 3, padding=1),
        )
        self.skip = nn.Identity() if channels_in == channels_out else nn.Conv2d(channels_in, channels_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


class UNet(nn.Module):
    """A GroupNorm U-Net image-to-image map [B, C, S, S] -> [B, C, S, S] in [-1, 1], the backbone the strongest
    public IGN replication trains on CelebA 64.

    ``depth`` resolution levels (each halves the side; S must be divisible by 2^(depth-1)), ``width`` channels
    at the first level, doubling per level up to 8x; ``blocks`` residual blocks per level; skip connections
    from every level of the encoder to the decoder. For 32-256 px: depth 3-5. The output is tanh-squashed
    like the DCGANs', so f(x) = x is reachable for data in [-1, 1].
    """

    def __init__(self, in_channels: int = 3, image_size: int = 64, width: int = 64, depth: int = 4,
                 blocks: int = 1, out_channels: int | None = None):
        super().__init__()
        in_channels = _check_positive_int("in_channels", in_channels)
        out_c = in_channels if out_channels is None else _check_positive_int("out_channels", out_channels)
        image_size = _check_positive_int("image_size", image_size)
        width = _check_positive_int("width", width)
        depth = _check_positive_int("depth", depth)
        blocks = _check_positive_int("blocks", blocks)
        if image_size % (2 ** (depth - 1)):
            raise ValueError(f"image_size must be divisible by 2^(depth-1) = {2 ** (depth - 1)} for depth {depth}, "
                             f"got {image_size}")
        self.config = {"name": "unet", "in_channels": in_channels, "image_size": image_size, "width": width,
                       "depth": depth, "blocks": blocks, **_out_channels_entry(in_channels, out_c)}
        channels = [width * 2 ** min(level, 3) for level in range(depth)]
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        previous = width
        for level, ch in enumerate(channels):
            self.down.append(nn.Sequential(*[_ResBlock(previous if b == 0 else ch, ch) for b in range(blocks)]))
            previous = ch
            if level < depth - 1:
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        self.middle = nn.Sequential(_ResBlock(previous, previous), _ResBlock(previous, previous))
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level in reversed(range(depth)):
            ch = channels[level]
            self.up.append(nn.Sequential(*[_ResBlock(previous + ch if b == 0 else ch, ch) for b in range(blocks)]))
            previous = ch
            if level > 0:
                self.upsample.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                                   nn.Conv2d(ch, channels[level - 1], 3, padding=1)))
                previous = channels[level - 1]
        self.head = nn.Sequential(nn.GroupNorm(group_norm_groups(previous), previous), nn.SiLU(),
                                  nn.Conv2d(previous, out_c, 3, padding=1), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, s = self.config["in_channels"], self.config["image_size"]
        if x.dim() != 4 or tuple(x.shape[1:]) != (c, s, s):
            raise ValueError(f"unet expects input [B, {c}, {s}, {s}], got {list(x.shape)}")
        h = self.stem(x)
        skips = []
        for level, block in enumerate(self.down):
            h = block(h)
            skips.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)
        h = self.middle(h)
        for i, block in enumerate(self.up):
            h = block(torch.cat([h, skips.pop()], dim=1))
            if i < len(self.upsample):
                h = self.upsample[i](h)
        return self.head(h)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "dcgan28": DCGAN28,
    "dcgan64": DCGAN64,
    "mlp": MLP,
    "unet": UNet,
}
MODEL_NAMES = tuple(_BUILDERS)


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a model by name; ``build_model(**model.config)`` rebuilds an identical architecture."""
    if name not in _BUILDERS:
        raise ValueError(f"name must be one of {list(MODEL_NAMES)}, got {name!r}")
    return _BUILDERS[name](**kwargs)


def expected_input_shape(model: nn.Module) -> tuple[int, ...]:
    """Per-sample input shape from ``model.config``: (C, H, W) for DCGANs, (dim,) for the MLP."""
    config = getattr(model, "config", None)
    if not isinstance(config, dict) or config.get("name") not in _BUILDERS:
        raise TypeError(f"model must be built by ign_fast.models, got {type(model).__name__}")
    name = config["name"]
    if name == "dcgan28":
        return (config["in_channels"], 28, 28)
    if name == "dcgan64":
        return (config["in_channels"], 64, 64)
    if name == "unet":
        return (config["in_channels"], config["image_size"], config["image_size"])
    return (config["dim"],)
