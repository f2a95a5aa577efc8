"""Random corruptions c(x) for the restoration training term λ_c · d(f(c(x)), x) (issue 13): the paper's
remark that f learns to project from seeing both the data and the noise, taken to the corruptions users want
undone. Each sample draws one corruption from the set: "mask" (a random square of 10-14 px, the masked-digit
benchmark's corruption, its pixels set to `mask_fill`, by default the mid-gray that Mask.initial feeds f at
restoration time; images only), "noise" (gaussian, σ 0.5, clipped to [-1, 1]) or "gray" (the BT.601 luminance
copied to the three channels, what Grayscale.initial feeds f; RGB images only).

Everything is drawn on x's device without reading a value on the host, so the term runs inside a CUDA graph
capture too (HostSyncGuard-checked in tests/test_corruptions.py)."""
import torch

from .operators import LUMA, MISSING_FILL

CORRUPTION_KINDS = ("mask", "noise", "gray")


def parse_kinds(text):
    """'mask,noise' -> ("mask", "noise"), or a one-line error naming the choices."""
    kinds = tuple(k.strip() for k in str(text).split(",") if k.strip())
    bad = [k for k in kinds if k not in CORRUPTION_KINDS]
    if not kinds or bad:
        raise ValueError(f"restore_corruptions must be a comma-separated list of {', '.join(CORRUPTION_KINDS)}; "
                         f"got {text!r}")
    return kinds


def square_masks(n, height, width, sides, device):
    """Bool [n, 1, height, width], False inside one random square per image (side uniform in sides,
    inclusive, clipped to the image), built from comparisons: no loop, no host read."""
    low, high = sides
    side = torch.randint(low, high + 1, (n, 1), device=device).clamp(max=min(height, width))
    top = (torch.rand(n, 1, device=device) * (height - side + 1)).floor()
    left = (torch.rand(n, 1, device=device) * (width - side + 1)).floor()
    rows = torch.arange(height, device=device).unsqueeze(0)
    cols = torch.arange(width, device=device).unsqueeze(0)
    in_rows = (rows >= top) & (rows < top + side)
    in_cols = (cols >= left) & (cols < left + side)
    return ~(in_rows[:, :, None] & in_cols[:, None, :]).unsqueeze(1)


def check_mask_fill(value):
    """A fill value in the images' range [-1, 1], or a one-line error naming restore_mask_fill."""
    try:
        fill = float(value)
    except (TypeError, ValueError):
        fill = float("nan")
    if not -1.0 <= fill <= 1.0:
        raise ValueError(f"restore_mask_fill must be a number in [-1, 1] (the images' range), got {value!r}")
    return fill


class TrainingCorruptions:
    """c(x): each sample of x corrupted by one kind drawn uniformly from those of `kinds` that apply to x: RGB
    images ([B, 3, H, W] in [-1, 1]) take every kind, other images all but "gray" (a gray image is its own
    luminance), other data only "noise"."""

    def __init__(self, kinds=CORRUPTION_KINDS, mask_sides=(10, 14), noise_std=0.5, mask_fill=MISSING_FILL):
        self.kinds = parse_kinds(",".join(kinds) if not isinstance(kinds, str) else kinds)
        self.mask_sides = mask_sides
        self.noise_std = float(noise_std)
        # Must be the fill restore feeds f (Mask(known, fill=...)), so f sees at restoration what it learnt on.
        self.mask_fill = check_mask_fill(mask_fill)

    def __call__(self, x):
        applies = {"noise": True, "mask": x.dim() == 4, "gray": x.dim() == 4 and x.shape[1] == 3}
        kinds = tuple(k for k in self.kinds if applies[k])
        if not kinds:
            raise ValueError(f"restore_corruptions {self.kinds} have nothing for data of shape "
                             f"{tuple(x.shape[1:])}: masks need images, gray needs RGB images; add noise")
        choice = torch.randint(len(kinds), (x.shape[0],) + (1,) * (x.dim() - 1), device=x.device)
        out = x
        for index, kind in enumerate(kinds):
            if kind == "mask":
                keep = square_masks(x.shape[0], x.shape[-2], x.shape[-1], self.mask_sides, x.device)
                corrupted = torch.where(keep, x, torch.full_like(x, self.mask_fill))
            elif kind == "gray":
                # Python-scalar weights: no tensor built from host data, so capture-safe like the rest
                luma = sum(w * x[:, c:c + 1] for c, w in enumerate(LUMA))
                corrupted = luma.expand_as(x)
            else:
                corrupted = x + self.noise_std * torch.randn_like(x)
                if x.dim() == 4:  # images stay in the model's range; toy data has no range
                    corrupted = corrupted.clamp(-1.0, 1.0)
            out = torch.where(choice == index, corrupted, out)
        return out
