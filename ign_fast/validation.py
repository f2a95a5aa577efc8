"""Checks for what a user can get wrong at the public entry points: each raises one line that names the
argument and what was expected (ValueError for values and shapes, TypeError for types)."""
import torch

FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def check_tensor(name, t, *, min_dim=1, floating=True):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dims (batch first), got shape {tuple(t.shape)}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float64, float32, bfloat16 or float16, got {t.dtype}")
    return t


def check_same(name, t, ref_name, ref, *, dtype=True):
    """t must match ref in shape, device and (optionally) dtype."""
    check_tensor(name, t, min_dim=0 if ref.dim() == 0 else 1)
    if t.shape != ref.shape:
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {t.device}")
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")
    return t


def check_distance_kind(name, kind):
    if kind not in ("l1", "l2"):
        raise ValueError(f"{name} must be 'l1' or 'l2', got {kind!r}")
    return kind


def check_nonempty_rows(name, t):
    if t.shape[0] > 0 and t[0].numel() == 0:
        raise ValueError(f"{name} must have at least one element per sample, got shape {tuple(t.shape)}")
    return t


def check_finite(name, t):
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return t


def check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _as_float(name, value):
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None


def check_nonnegative_float(name, value):
    v = _as_float(name, value)
    if not (v >= 0.0) or v == float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return v


def check_positive_float(name, value):
    v = _as_float(name, value)
    if not (v > 0.0) or v == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def check_clamp_ratio(value, name="tight_clamp_ratio"):
    """The tightness clamp's ratio: None (no clamp) or a finite number > 0."""
    if value is None:
        return None
    ratio = check_nonnegative_float(name, value)
    if ratio == 0:
        raise ValueError(f"{name} must be > 0 or None (no clamp), got 0")
    return ratio
