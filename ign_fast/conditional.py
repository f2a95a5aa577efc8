"""Class-conditional f (issue 14): the label enters as K one-hot planes appended to the image's channels.

x̃ = cat(x, planes(y)) is a [B, C+K, H, W] tensor, so every training step (IGN's reference, fused and graph
modes, NAIGN) runs on it unchanged: it is just the data. `LabelConditioned(base, K, C)` runs base on x̃ (base
takes C+K channels and returns C, or C+K of which the first C are kept, so any module that keeps its input's
shape works too) and returns cat(base(x̃)[:, :C], x̃[:, C:]): the label planes pass through exactly. Hence

  - f(f(z̃)) keeps z̃'s label, so idempotence, f(x) = x and the tightness term hold per class;
  - the label planes add exactly 0 to every loss term (rec, idem, tight, imle, restore);
  - in NAIGN's nearest-neighbour search a candidate of another class is 2·H·W (l1, planes of 0 and 1)
    further from a data point than it would be on the image alone, which is the largest l1 distance two
    one-channel images in [-1, 1] can have: for C = 1 and l1 the matched candidate always has the data
    point's label (docs/CONDITIONAL.md measures it for the run it documents).

The public conditional IGN feeds the label as a learned embedding; planes keep "any nn.Module" working (a
user's module only has to accept C+K channels) and need no change to the steps or the exported graphs' ops.
"""
import torch
from torch import nn

# Label planes carry 1 for the requested class and 0 elsewhere; `planes` writes them as a comparison with
# arange rather than F.one_hot so TorchScript, torch.export and ONNX carry the same plain ops.


def label_planes(labels, num_classes, spatial, dtype, device=None):
    """[B] integer labels -> [B, K, *spatial] planes: 1 on the label's channel, 0 on the others. A label
    outside [0, K) gives all-zero planes (check_labels rejects it before, where labels come from a user)."""
    classes = torch.arange(num_classes, device=labels.device)
    onehot = (labels.reshape(-1, 1) == classes.reshape(1, -1)).to(dtype)
    onehot = onehot.reshape(onehot.shape[0], num_classes, *([1] * len(spatial)))
    out = onehot.expand(onehot.shape[0], num_classes, *spatial)
    return out if device is None else out.to(device)


def condition(x, labels, num_classes):
    """x̃ = cat(x, label planes): [B, C, *spatial] images and [B] labels -> [B, C+K, *spatial]."""
    planes = label_planes(labels.to(x.device), num_classes, tuple(x.shape[2:]), x.dtype)
    return torch.cat([x, planes], dim=1)


def check_labels(labels, num_classes, n=None, name="labels"):
    """labels as an int64 CPU tensor [n]: an int (repeated n times), a list of ints or an integer tensor;
    ValueError (one line, naming `name`) for anything else, a wrong count, or a label outside [0, K)."""
    if isinstance(labels, bool):
        raise ValueError(f"{name} must be an int, a list of ints or an integer tensor, got a bool")
    if isinstance(labels, int):
        if n is None:
            raise ValueError(f"{name} must be a list or tensor of labels here, got the single int {labels}")
        labels = [labels] * n
    if isinstance(labels, (list, tuple)):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
            raise ValueError(f"{name} must hold ints, got {[type(v).__name__ for v in labels][:3]}...")
        labels = torch.tensor(labels, dtype=torch.int64).reshape(-1)
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"{name} must be an int, a list of ints or an integer tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"{name} must be integer class indices, got dtype {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"{name} must be one label per sample ([n]), got shape {list(labels.shape)}")
    if n is not None and labels.shape[0] != n:
        raise ValueError(f"{name} must hold {n} labels (one per sample), got {labels.shape[0]}")
    labels = labels.to("cpu", torch.int64)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = int(labels[(labels < 0) | (labels >= num_classes)][0])
        raise ValueError(f"{name} must be class indices in 0..{num_classes - 1} for this {num_classes}-class "
                         f"model, got {bad}")
    return labels


def cycling_labels(n, num_classes):
    """0, 1, ..., K-1, 0, 1, ...: the labels a conditional generate() uses when none are given."""
    return torch.arange(n, dtype=torch.int64) % num_classes


def balanced_labels(n, num_classes, generator=None):
    """n labels with every class as often as n allows (counts differ by at most one), in random order: the
    labels of the noise a conditional run trains on, so NAIGN's pool of k·B candidates holds every class."""
    return cycling_labels(n, num_classes)[torch.randperm(n, generator=generator)]


class LabelConditioned(nn.Module):
    """f(x̃) = cat(base(x̃)[:, :C], x̃[:, C:]) for x̃ = cat(x, label planes) (see the module docstring).

    base: any nn.Module taking [B, C+K, ...] and returning [B, C, ...] or [B, C+K, ...]. num_classes: K.
    image_channels: C."""

    def __init__(self, base, num_classes, image_channels):
        super().__init__()
        if not isinstance(base, nn.Module):
            raise TypeError(f"base must be a torch.nn.Module, got {type(base).__name__}")
        for name, value, low in (("num_classes", num_classes, 2), ("image_channels", image_channels, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        self.base = base
        self.num_classes = num_classes
        self.image_channels = image_channels

    def extra_repr(self):
        return f"num_classes={self.num_classes}, image_channels={self.image_channels}"

    def forward(self, x):
        c, k = self.image_channels, self.num_classes
        if x.dim() < 3 or x.shape[1] != c + k:
            raise ValueError(f"a class-conditional model takes [B, {c} image + {k} label channels, ...], got "
                             f"{list(x.shape)}")
        out = self.base(x)
        if (not isinstance(out, torch.Tensor) or out.dim() != x.dim() or out.shape[0] != x.shape[0]
                or out.shape[2:] != x.shape[2:] or out.shape[1] not in (c, c + k)):
            got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"the base model of a class-conditional model must return [B, {c}, ...] (or its "
                             f"input's {c + k} channels) for input {list(x.shape)}, got {got}")
        return torch.cat([out[:, :c], x[:, c:].to(out.dtype)], dim=1)


def conditional_record(base_record, num_classes, image_channels):
    """The model record (ign_fast.model_record) of LabelConditioned(base): JSON, no pickle."""
    return {"conditional": {"num_classes": num_classes, "image_channels": image_channels}, "base": base_record}


@torch.no_grad()
def apply_conditioned(model, images, labels, steps=1):
    """f^steps on images of the given labels (inference normalisation of ign_fast.inference.apply_f):
    the label planes stay fixed through the steps; returns the image channels [B, C, ...]."""
    from .inference import apply_f

    x = condition(images, labels, model.num_classes)
    return apply_f(model, x, steps)[:, :model.image_channels]


class ImageChannelsOnly:
    """A training corruption (ign_fast.corruptions) applied to the first C channels of x̃ only: the
    restoration term teaches f to undo damage to the image, while the label planes, which f passes through,
    stay the label."""

    def __init__(self, corrupt, image_channels):
        self.corrupt, self.image_channels = corrupt, image_channels

    def __call__(self, x):
        c = self.image_channels
        return torch.cat([self.corrupt(x[:, :c]), x[:, c:]], dim=1)
