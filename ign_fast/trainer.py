"""Trains an IGN or NAIGN model on a data set, with checkpoints, sample grids, a metrics CSV and exact
resume (on CPU a resumed run's losses equal an uninterrupted run's).

Under torchrun (ign_fast/distributed.py) batch_size is the global batch: each of R ranks trains on its own
B/R-sample shard of it, gradients are averaged across ranks every step, and only rank 0 writes logs, samples
and checkpoints. The noise stream is shared: every rank draws the global batch's noise and takes its own
slice (IGN), or holds the global pool and makes 1/R of its candidates (NAIGN, distributed.CandidateGather),
so R ranks compute what one process on the global batch does. A checkpoint's data position counts global
batches and its noise state is the one shared stream, so resuming with another number of ranks continues
exactly, on the same global batches and the same noise (see docs/RELIABILITY.md).

A step whose loss is not finite is skipped (no update) and counted; max_nonfinite_steps of them in a row stop
training with NonFiniteTrainingError, and no checkpoint is written at a skipped step.

The trainer composes objects, as Lightning's Trainer does: `Trainer(config, model=..., data=...)` takes any
nn.Module whose output has its input's shape and any data (a tensor [N, ...], kept in memory, or a map-style
Dataset of images or (image, label) pairs, streamed by worker processes); the config builds what is not given
(a built-in model or MODULE:ATTR with model_kwargs; a named data set, "images" streamed from disk). A
checkpoint records how to rebuild the model (ign_fast.model_record), never a pickle of it.
"""
import csv
import dataclasses
import json
import math
import os
import sys
import time

import torch

from . import checkpoint as ckpt
from . import distributed
from .data import InMemoryLoader, load_dataset
from .ema import EMA
from .images import border_mean, save_image_grid
from .inference import generate
from .model_record import build as build_named_model
from .model_record import parse_target, record_for
from .models import MODEL_NAMES, UNet, build_model
from .naign import NAIGNLoss, NAIGNStep
from .noise import build_prior
from .objectives import IGNLoss
from .step import IGNStep, frozen_state
from .streaming import ImageFolderDataset, StreamingLoader, to_model_range
from .conditional import LabelConditioned, balanced_labels, condition, conditional_record


@dataclasses.dataclass
class TrainConfig:
    objective: str = "naign"          # "ign" (Shocher et al.) or "naign" (reconstruction + IMLE)
    data: str = "mnist5k"
    data_root: str | None = None
    image_size: int | None = None
    model: str = "dcgan28"            # a built-in name (dcgan28, dcgan64, mlp, unet) or MODULE:ATTR
    model_kwargs: dict | None = None  # JSON keyword arguments of the model (MODULE:ATTR, or unet's depth/blocks)
    trust_model_code: bool = False    # MODULE:ATTR may name a factory function, not only an nn.Module class
    norm: str = "group"
    latent_dim: int = 64
    width: int = 32
    steps: int | None = None          # total steps to reach; None: 2000, or 6000 for NAIGN on the toy sets
    batch_size: int | None = None     # None: 256 for ign, 64 for naign
    lr: float | None = None           # None: 1e-4 for ign, 5e-4 for naign
    lr_schedule: str = "constant"     # "cosine": lr follows a half cosine from lr to 0 over `steps`
    beta1: float = 0.5
    beta2: float = 0.999
    distance: str = "l1"
    lambda_rec: float | None = None   # None: 20 for ign, 1 for naign
    lambda_idem: float | None = None  # None: 20 for ign, 0 for naign
    lambda_tight: float | None = None  # None: 2.5 for ign, 0 for naign (> 0 there: the hybrid, docs/IGN.md)
    tight_clamp_ratio: float | None = 1.5
    tight_warmup: int = 0             # λ_tight rises from 0 to lambda_tight over this many steps (0: off)
    tight_warmup_shape: str = "linear"  # "linear" ramp, or "exp": λ_t·(1 - exp(-5·step/tight_warmup))
    lambda_imle: float | None = None  # None: 1 for naign, 0 for ign (> 0 there: the IGN + IMLE hybrid)
    lambda_restore: float = 0.0       # weight of d(f(c(x)), x), c drawn from restore_corruptions (issue 13)
    restore_corruptions: str = "mask,noise"
    restore_distance: str | None = None  # the term's distance; None: `distance`
    restore_mask_fill: float = 0.0    # the value of a masked square's pixels in the term (= operators.MISSING_FILL)
    candidates: int = 8
    refresh_every: int = 4             # NAIGN: a new pool and its candidates every 4 steps (docs/NAIGN.md)
    prior: str = "gaussian"
    sample_prior: str | None = None   # the prior generation draws from (sampling, eval, export); None: `prior`.
                                      # "mixture": train from noise, generate from the data's mixture
    prior_components: int = 64        # a "mixture" prior: k-means clusters of the data, each a Gaussian
    prior_rank: int = 16              # a "mixture" prior: principal directions per cluster (docs/NAIGN.md)
    step_mode: str = "auto"            # auto: fused (graph is opt-in until it has passed on a GPU)
    device: str = "auto"
    amp: str = "auto"                 # "bf16" autocast on GPU, "none"; auto: bf16 on CUDA, none on CPU
    seed: int = 0
    out: str = "runs/ign"
    log_every: int = 10
    sample_every: int = 500
    checkpoint_every: int = 500
    keep: int = 3
    progress: bool | str = True       # True/"auto": a bar on a terminal, plain lines when piped; "lines"; False
    max_nonfinite_steps: int = 10     # non-finite steps in a row (each skipped) before training stops
    sync_batchnorm: bool = False      # under torchrun: BatchNorm statistics over the global batch (CUDA only)
    ema_decay: float | None = 0.999   # EMA of the weights, used for sampling, projection, export (docs/NAIGN.md);
                                      # None: off
    num_workers: int = 2              # processes decoding streamed images (data "images" or a Dataset)
    conditional: bool = False         # class-conditional f: the label as one-hot input planes
                                      # (ign_fast/conditional.py, docs/CONDITIONAL.md); needs labelled data

    def resolved(self):
        """A copy with every None default replaced by the objective's own default."""
        ign = self.objective == "ign"
        c = dataclasses.replace(self)
        c.batch_size = c.batch_size or (256 if ign else 64)
        # NAIGN on the low-dimensional toy sets: lr 2e-3 and an idempotence term (λ_idem = 1) move eight
        # gaussians' high-quality share from 0.29 to 0.88 (3 seeds, all modes covered; docs/NAIGN.md, toy sets)
        toy = c.data in ("trimodal", "8gaussians", "moons", "rings") and not ign
        c.lr = c.lr if c.lr is not None else (1e-4 if ign else 2e-3 if toy else 5e-4)
        # and 6,000 steps: at 2,000 the samples of two moons and rings still lie between the arcs (high-quality
        # share 0.46-0.67); at 6,000 every arc is covered and 0.80-0.88 of them lie on the curves (3 seeds each)
        c.steps = c.steps if c.steps is not None else (6000 if toy else 2000)
        c.lambda_rec = c.lambda_rec if c.lambda_rec is not None else (20.0 if ign else 1.0)
        c.lambda_idem = c.lambda_idem if c.lambda_idem is not None else (20.0 if ign else 1.0 if toy else 0.0)
        c.lambda_imle = c.lambda_imle if c.lambda_imle is not None else (0.0 if ign else 1.0)
        c.lambda_tight = c.lambda_tight if c.lambda_tight is not None else (2.5 if ign else 0.0)
        return c


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available")
    return device


def validate_config(c):
    from .data import DATASET_NAMES
    from .models import MODEL_NAMES
    from .noise import PRIOR_KINDS

    if c.model not in MODEL_NAMES:
        parse_target(c.model)  # a one-line error naming the built-in names and the MODULE:ATTR form
    if c.model_kwargs is not None:
        from .model_record import check_kwargs

        check_kwargs(c.model_kwargs)
    if c.ema_decay is not None and (isinstance(c.ema_decay, bool) or not isinstance(c.ema_decay, (int, float))
                                    or not 0 < c.ema_decay < 1):
        raise ValueError(f"ema_decay must be a number in (0, 1), e.g. 0.999, or None, got {c.ema_decay!r}")
    if isinstance(c.num_workers, bool) or not isinstance(c.num_workers, int) or c.num_workers < 0:
        raise ValueError(f"num_workers must be an integer >= 0, got {c.num_workers!r}")
    if not isinstance(c.trust_model_code, bool):
        raise ValueError(f"trust_model_code must be True or False, got {c.trust_model_code!r}")
    if not isinstance(c.conditional, bool):
        raise ValueError(f"conditional must be True or False, got {c.conditional!r}")
    choices = {"objective": ("ign", "naign"), "data": DATASET_NAMES,
               "norm": ("batch", "group", "none"), "distance": ("l1", "l2"), "prior": PRIOR_KINDS,
               "step_mode": ("auto", "reference", "fused", "graph"), "amp": ("auto", "bf16", "none"),
               "lr_schedule": ("constant", "cosine"), "tight_warmup_shape": ("linear", "exp")}
    for name, allowed in choices.items():
        if getattr(c, name) not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}; got {getattr(c, name)!r}")
    for name in ("steps", "batch_size", "latent_dim", "width", "log_every", "sample_every", "checkpoint_every",
                 "keep", "candidates", "refresh_every", "max_nonfinite_steps", "prior_components", "prior_rank"):
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if c.sample_prior is not None and c.sample_prior not in PRIOR_KINDS:
        raise ValueError(f"sample_prior must be one of {', '.join(PRIOR_KINDS)} or None (the training prior); "
                         f"got {c.sample_prior!r}")
    for name in ("prior", "sample_prior"):
        if getattr(c, name) == "mixture" and c.conditional:
            raise ValueError(f"{name} 'mixture' cannot be used with conditional: its clusters do not follow the "
                             "labels, so a sample's cluster and its requested class would disagree")
    if c.lr_schedule != "constant" and c.step_mode == "graph":  # the captured optimizer step bakes lr in
        raise ValueError("lr_schedule 'cosine' needs step_mode auto, fused or reference: a CUDA graph replays "
                         "the learning rate it was captured with")
    if isinstance(c.tight_warmup, bool) or not isinstance(c.tight_warmup, int) or c.tight_warmup < 0:
        raise ValueError(f"tight_warmup must be an integer >= 0 (steps; 0: off), got {c.tight_warmup!r}")
    if c.tight_warmup > 0 and not c.lambda_tight:
        raise ValueError("tight_warmup needs a tightness term: objective 'ign', or lambda_tight > 0 (NAIGN's "
                         "default is 0)")
    if c.tight_warmup > 0 and c.step_mode == "graph":  # the captured loss bakes λ_tight in
        raise ValueError("tight_warmup needs step_mode auto, fused or reference: a CUDA graph replays the "
                         "tightness weight it was captured with")
    from .corruptions import check_mask_fill, parse_kinds

    parse_kinds(c.restore_corruptions)
    check_mask_fill(c.restore_mask_fill)
    if c.restore_distance not in (None, "l1", "l2"):
        raise ValueError(f"restore_distance must be 'l1', 'l2' or None (--distance), got {c.restore_distance!r}")
    for name in ("lr", "lambda_rec", "lambda_idem", "lambda_tight", "lambda_imle", "lambda_restore"):
        value = getattr(c, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if c.lr <= 0:
        raise ValueError(f"lr must be > 0, got {c.lr!r}")
    if c.tight_clamp_ratio is not None and not c.tight_clamp_ratio > 0:
        raise ValueError(f"tight_clamp_ratio must be > 0 or None, got {c.tight_clamp_ratio!r}")
    for name in ("beta1", "beta2"):
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    if isinstance(c.seed, bool) or not isinstance(c.seed, int) or c.seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {c.seed!r}")
    if c.image_size is not None and (isinstance(c.image_size, bool) or not isinstance(c.image_size, int)
                                     or c.image_size <= 0):
        raise ValueError(f"image_size must be a positive integer or None, got {c.image_size!r}")
    for name in ("out", "data_root"):
        value = getattr(c, name)
        if not (isinstance(value, (str, os.PathLike)) and os.fspath(value)) and not (name == "data_root"
                                                                                      and value is None):
            raise ValueError(f"{name} must be a non-empty path{' or None' if name == 'data_root' else ''}, "
                             f"got {value!r}")
    if c.data_root is not None and not os.path.isdir(c.data_root):  # before any loader says "root"
        raise ValueError(f"data_root (--data-root) must be an existing folder, got {os.fspath(c.data_root)!r}")
    if not (isinstance(c.progress, bool) or c.progress in ("auto", "lines")):
        raise ValueError(f"progress must be True or False, 'auto' or 'lines', got {c.progress!r}")
    if not isinstance(c.sync_batchnorm, bool):
        raise ValueError(f"sync_batchnorm must be True or False, got {c.sync_batchnorm!r}")
    if c.sync_batchnorm and c.norm != "batch":
        raise ValueError(f"sync_batchnorm needs norm 'batch', got norm {c.norm!r}")
    resolve_device(c.device)


def unet_depth_for(size):
    """The deepest U-Net (at most 5 levels) whose coarsest feature map is still at least 4 pixels wide."""
    depth = 1
    while depth < 5 and size % (2 ** depth) == 0 and size // (2 ** depth) >= 4:
        depth += 1
    return depth


def build_model_for(config, sample_shape, out_channels=None):
    """(model, record): the model named in config, sized for data of per-sample shape sample_shape, and how
    a checkpoint rebuilds it. out_channels: a built-in image model's output channels where they differ from
    its input's (a class-conditional run's base model takes the label planes too)."""
    kwargs = dict(config.model_kwargs or {})
    if out_channels is not None and config.model in ("dcgan28", "dcgan64", "unet"):
        kwargs.setdefault("out_channels", out_channels)
    if config.model not in MODEL_NAMES:  # MODULE:ATTR: the user's own model, built by its kwargs alone
        model = build_named_model(config.model, kwargs, config.trust_model_code)
        return model, record_for(model, kwargs=kwargs, target=config.model)
    if config.model == "mlp":
        if len(sample_shape) != 1:
            raise ValueError(f"model 'mlp' needs vector data, got samples of shape {tuple(sample_shape)}")
        model = build_model("mlp", **{"dim": sample_shape[0], **kwargs})
    elif config.model == "unet":
        if len(sample_shape) != 3 or sample_shape[1] != sample_shape[2]:
            raise ValueError(f"model 'unet' needs square images, got samples of shape {tuple(sample_shape)}")
        options = {"width": config.width, "depth": unet_depth_for(sample_shape[1]), **kwargs}
        model = UNet(in_channels=sample_shape[0], image_size=sample_shape[1], **options)
    else:
        expected = {"dcgan28": 28, "dcgan64": 64}[config.model]
        if len(sample_shape) != 3 or sample_shape[1] != expected or sample_shape[2] != expected:
            raise ValueError(f"model {config.model!r} needs images of {expected}x{expected}, got samples of shape "
                             f"{tuple(sample_shape)}")
        options = {"latent_dim": config.latent_dim, "width": config.width, "norm": config.norm, **kwargs}
        model = build_model(config.model, in_channels=sample_shape[0], **options)
    return model, record_for(model)


def check_model_fits(model, sample, what="data samples"):
    """The model must map a batch of the data to the same shape: one forward on two samples, with the
    buffers cloned (BatchNorm's running statistics untouched), so a mismatch is one line before training,
    also when the model's own forward fails on that shape (a user's module expecting other channels)."""
    from torch.func import functional_call

    try:
        with torch.no_grad():
            out = functional_call(model, frozen_state(model), (sample,))
    except (RuntimeError, ValueError, TypeError, IndexError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"model cannot run on {what} of shape {tuple(sample.shape[1:])}: {first}") from None
    if not isinstance(out, torch.Tensor) or out.shape != sample.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model must return its input's shape: for data samples of shape {tuple(sample.shape[1:])} "
                         f"it returned {got} for a batch of {sample.shape[0]}")


# The Fourier prior's statistics and the border brightness come from at most this many samples: a bounded
# sample, not the whole data set in memory (MNIST-5k's 4,000 training digits are all used)
PRIOR_FIT_SAMPLES = 10_000
STREAMED_PRIOR_FIT_SAMPLES = 2_048  # decoded from disk at start-up: a few seconds


def data_sample(source, limit, seed):
    """Up to `limit` samples of a tensor or Dataset, in [-1, 1] floats: all of them when there are fewer, else
    a seeded random subset."""
    n = source.shape[0] if isinstance(source, torch.Tensor) else len(source)
    index = torch.arange(n) if n <= limit else torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit]
    if isinstance(source, torch.Tensor):
        return source[index]
    items = [source[int(i)] for i in index]
    images = [item if isinstance(item, torch.Tensor) else item[0] for item in items]
    return to_model_range(torch.stack(images)).float()


def build_step(config, model, optimizer, sample_noise, device, amp_dtype, loss_scale=1.0, image_channels=None):
    """loss_scale multiplies every λ: a class-conditional run's per-sample distances are means over C+K
    channels of which the K label planes add exactly 0, so its terms are C/(C+K) of the image's; λ·(C+K)/C
    gives it the loss and the gradients an unconditional run with the same λ has. image_channels: where set
    (a conditional run), the restoration term corrupts only these leading channels, never the label planes."""
    # check_inputs=False: the trainer checks its data for NaN/inf once when it loads it, and its noise comes
    # from the prior; a per-step check would cost a host sync every step
    mode = config.step_mode
    if mode == "auto":  # the fused step everywhere: mode="graph" has not yet passed on a GPU (issue 11); it is
        mode = "fused"  # one flag away (--step-mode graph) and becomes the CUDA default with a recorded GPU run
    corrupt = None
    if config.lambda_restore > 0:
        from .corruptions import TrainingCorruptions, parse_kinds

        corrupt = TrainingCorruptions(parse_kinds(config.restore_corruptions), mask_fill=config.restore_mask_fill)
        if image_channels is not None:  # a conditional run: the label planes are not corrupted
            from .conditional import ImageChannelsOnly

            corrupt = ImageChannelsOnly(corrupt, image_channels)
    if config.objective == "ign":
        loss = IGNLoss(config.distance, config.lambda_rec * loss_scale, config.lambda_idem * loss_scale,
                       config.lambda_tight * loss_scale, config.tight_clamp_ratio, config.lambda_restore * loss_scale,
                       config.restore_distance, config.lambda_imle * loss_scale)
        return IGNStep(model, optimizer, loss=loss, mode=mode, amp_dtype=amp_dtype, check_inputs=False,
                       corrupt=corrupt)
    loss = NAIGNLoss(config.distance, config.lambda_rec * loss_scale, config.lambda_imle * loss_scale,
                     config.lambda_idem * loss_scale, config.candidates, config.refresh_every,
                     config.lambda_restore * loss_scale, config.restore_distance,
                     config.lambda_tight * loss_scale, config.tight_clamp_ratio)
    # NAIGN has no four-call reference step to choose: "reference" runs its one eager implementation
    return NAIGNStep(model, optimizer, loss=loss, sample_noise=sample_noise, amp_dtype=amp_dtype,
                     check_inputs=False, mode="graph" if mode == "graph" else "fused", corrupt=corrupt)


def _is_terminal(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def format_seconds(seconds):
    """0.4 s, 12 s, 3 min 05 s, 1 h 02 min: a duration a person reads at a glance."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def progress_line(step, total, terms, rate):
    """One plain log line: step, the loss terms, steps/s and the time left at that rate."""
    losses = " ".join(f"{k} {v:.4g}" for k, v in terms.items())
    eta = format_seconds((total - step) / rate) if rate > 0 else "?"
    return f"step {step}/{total}  {losses}  {rate:.1f} steps/s  ETA {eta}"


def conditional_labels(source, labels, name):
    """(labels as int64 [N] or None for a Dataset, num_classes) for a class-conditional run, or a one-line
    error: --conditional needs images with labels (a tensor's labels, or a Dataset of (image, label) pairs
    that says how many classes it has by `classes` or `num_classes`)."""
    hint = ("train without --conditional, or on labelled data (mnist5k, mnist; in Python data=(images, labels) "
            "or a Dataset of (image, label) pairs)")
    if isinstance(source, torch.Tensor):
        if source.dim() != 4:
            raise ValueError(f"--conditional (conditional=True) needs images [N, C, H, W]; {name} has samples of "
                             f"shape {tuple(source.shape[1:])}: {hint}")
        if labels is None:
            raise ValueError(f"--conditional (conditional=True) needs labelled data; {name} has no labels: {hint}")
        if (not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != source.shape[0]
                or labels.dtype.is_floating_point or labels.dtype == torch.bool):
            got = f"{labels.dtype} {list(labels.shape)}" if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"--conditional (conditional=True) needs one integer label per image ({source.shape[0]}),"
                             f" got labels {got}")
        labels = labels.to(torch.int64)
        if int(labels.min()) < 0:
            raise ValueError(f"--conditional (conditional=True) needs labels >= 0, got {int(labels.min())}")
        num_classes = int(labels.max()) + 1
    else:
        if isinstance(source, ImageFolderDataset):
            raise ValueError(f"--conditional (conditional=True) needs labelled data; {name} (image files) has no "
                             f"labels: {hint}")
        classes = getattr(source, "classes", None)
        num_classes = len(classes) if classes is not None else getattr(source, "num_classes", None)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int):
            raise ValueError("--conditional (conditional=True) with a Dataset needs it to yield (image, label) "
                             "pairs and to name its classes by a `classes` list or a `num_classes` int")
    if num_classes < 2:
        raise ValueError(f"--conditional (conditional=True) needs at least 2 classes, {name} has {num_classes}")
    return labels, num_classes


def conditioned_model(model, record, num_classes, image_channels):
    """(LabelConditioned model, its record): model wrapped unless it already is (with the data's classes)."""
    if isinstance(model, LabelConditioned):
        if (model.num_classes, model.image_channels) != (num_classes, image_channels):
            raise ValueError(f"model is LabelConditioned for {model.num_classes} classes of {model.image_channels}-"
                             f"channel images, the data has {num_classes} classes of {image_channels}-channel images")
        return model, record
    return LabelConditioned(model, num_classes, image_channels), conditional_record(record, num_classes,
                                                                                    image_channels)


class NonFiniteTrainingError(RuntimeError):
    """Training stopped: too many steps in a row had a non-finite loss."""


def check_data(name, data):
    """Once, at load: the data a run trains on must be a non-empty float tensor without NaN or inf."""
    if not isinstance(data, torch.Tensor) or not data.is_floating_point():
        raise ValueError(f"data {name!r} must load as a float tensor, got "
                         f"{data.dtype if isinstance(data, torch.Tensor) else type(data).__name__}")
    if data.dim() < 2 or data.shape[0] == 0 or data[0].numel() == 0:
        raise ValueError(f"data {name!r} must have shape [N, ...] with N >= 1 samples, got {tuple(data.shape)}")
    bad = (~torch.isfinite(data)).flatten(1).any(1).nonzero()
    if bad.numel():
        raise ValueError(f"data {name!r} contains NaN or inf in {bad.numel()} samples (first: index "
                         f"{int(bad[0])})")


class MetricsLog:
    """metrics.csv in the run folder; on resume, rows past the checkpoint's step are dropped first."""

    def __init__(self, path, resume_step=None):
        self.path = path
        self.rows = []
        if resume_step is not None and os.path.exists(path):
            with open(path, newline="") as f:
                # a run killed while appending leaves a torn last row (e.g. "1" of "12,..."): only rows with
                # every field are kept, so a torn step number cannot pass for an earlier step
                self.rows = [r for r in csv.DictReader(f) if None not in r.values() and None not in r
                             and r["step"].isdigit() and int(r["step"]) <= resume_step]
        self.fields = list(self.rows[0].keys()) if self.rows else None
        self._rewrite()

    def _rewrite(self):
        with open(self.path, "w", newline="") as f:
            if self.fields:
                writer = csv.DictWriter(f, fieldnames=self.fields)
                writer.writeheader()
                writer.writerows(self.rows)

    def append(self, row):
        if self.fields is None:
            self.fields = list(row.keys())
            self._rewrite()
        self.rows.append(row)
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields).writerow({k: row.get(k, "") for k in self.fields})


def _tensorboard(run_dir):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional
        return None
    return SummaryWriter(os.path.join(run_dir, "tensorboard"))


class RunFolderInUseError(ValueError):
    """The run folder already holds a run and neither resume nor overwrite was asked for."""


# What a run and the commands run on it (sample, project) write into its folder by default; overwrite removes
# these, so nothing of the old model is left to pass for the new one, and nothing else of the user's
RUN_OUTPUTS = ("checkpoints", "samples", "samples.png", "metrics.csv", "config.json", "tensorboard", "project")


# Settings a checkpoint cannot carry into another value: its NAIGN pool and loss terms, its data position, its
# prior's state and its input planes mean something only under the run's own. (The model's settings are checked
# through its record, batch_size through the data position.) Every other setting may change at resume.
FIXED_AT_START = ("objective", "data", "image_size", "prior", "sample_prior", "prior_components", "prior_rank",
                  "conditional")
# what a resume is expected to change, and says nothing about
RESUME_BOOKKEEPING = ("out", "steps", "progress")


def resumed_setting_changes(saved, config):
    """[(field, saved value, new value)] for the settings `config` (resolved) changes against the checkpoint's
    saved config; CheckpointError (one line) when it changes one fixed at the start of a run. Checkpoints written
    before a field existed say nothing about it."""
    current = dataclasses.asdict(config)
    for field in FIXED_AT_START:
        if field in saved and saved[field] != current[field]:
            raise ckpt.CheckpointError(f"resume needs the checkpoint's {field} {saved[field]!r}, got "
                                       f"{current[field]!r}: it is fixed when a run starts; for another, start "
                                       "a new run (another --out, or --overwrite)")
    return [(field, saved[field], value) for field, value in current.items()
            if field in saved and field not in RESUME_BOOKKEEPING and saved[field] != value]


def check_run_folder(out, resume, overwrite):
    """A fresh run needs an empty (or absent) folder: training over another run's files would replace its
    config and metrics and mix its checkpoints with the new ones (issue 12). Reads only, so every rank can
    call it before any rank writes."""
    if resume and overwrite:
        raise ValueError("resume and overwrite contradict each other: pass one of them")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"out must be a folder, got the file {os.fspath(out)!r}")
    if resume or overwrite or not os.path.isdir(out):
        return
    if os.listdir(out):
        raise RunFolderInUseError(f"run folder {os.fspath(out)!r} is not empty: pass --resume to continue "
                                  "that run, another --out for a new one, or --overwrite to replace it (in "
                                  "Python: resume=True or overwrite=True)")


def clear_run_outputs(out):
    """Remove what an earlier run wrote into out (RUN_OUTPUTS), leaving anything else the user put there."""
    import shutil

    for name in RUN_OUTPUTS:
        path = os.path.join(out, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


class Trainer:
    def __init__(self, config, resume=False, overwrite=False, model=None, data=None, model_kwargs=None):
        """model: an nn.Module to train instead of the config's (model_kwargs: the JSON keyword arguments its
        class is rebuilt with from a checkpoint; without them, load the run with Projector.load(run,
        model=instance)). data: a tensor [N, ...] or a map-style Dataset instead of the config's data set."""
        self.config = config.resolved()
        validate_config(self.config)
        c = self.config
        check_run_folder(c.out, resume, overwrite)
        self.dist, device_name = distributed.init_from_env(c.device)
        world = self.dist.world_size
        if c.batch_size % world:
            raise ValueError(f"batch_size (the global batch) must be divisible by the {world} ranks, got "
                             f"{c.batch_size}")
        if c.sync_batchnorm and self.dist.enabled and not device_name.startswith("cuda"):
            raise ValueError("sync_batchnorm needs CUDA devices (torch's SyncBatchNorm has no CPU path); "
                             "train on GPUs or without --sync-batchnorm")
        self.device = resolve_device(device_name)
        torch.manual_seed(c.seed)
        source, labels = self._data_source(data)
        self.num_classes = self.labels = None
        if c.conditional:  # before anything is sized: data without labels is a one-line error here
            self.labels, self.num_classes = conditional_labels(source, labels, repr(c.data) if data is None
                                                               else "the data given")
        self.data = source if isinstance(source, torch.Tensor) else None  # in memory, or None when streamed
        fit_limit = PRIOR_FIT_SAMPLES if self.data is not None else STREAMED_PRIOR_FIT_SAMPLES
        fitted = {"fourier", "mixture"} & {c.prior, c.sample_prior}
        sample = data_sample(source, fit_limit if fitted else 256, c.seed)
        count = self.data.shape[0] if self.data is not None else len(source)
        shard = math.ceil(count / world)  # as the loaders deal the data out to the ranks
        if c.batch_size // world > shard:
            ranks = f" ({shard} per rank on {world} ranks)" if world > 1 else ""
            name = repr(c.data) if data is None else "the data given"
            raise ValueError(f"batch_size {c.batch_size} is larger than the data set: {name} has {count} samples"
                             f"{ranks}; pass a batch_size of at most {shard * world}")
        if self.data is not None:
            check_data(c.data if data is None else "data", self.data)
            served = self.data if self.labels is None else (self.data, self.labels)
            self.loader = InMemoryLoader(served, c.batch_size // world, seed=c.seed, rank=self.dist.rank,
                                         world_size=world)
        else:
            self.loader = StreamingLoader(source, c.batch_size // world, seed=c.seed, rank=self.dist.rank,
                                          world_size=world, num_workers=c.num_workers,
                                          with_labels=self.num_classes is not None)
        self.sample_shape = tuple(sample.shape[1:])
        # recorded in checkpoints so `ign-fast project --images` can tell a scan's paper from the data's
        # background (dark strokes on white against white-on-black digits) and invert it
        self.data_border_mean = float(border_mean(sample[:1000]).mean()) if sample.dim() == 4 else None
        model_shape = self.sample_shape
        if self.num_classes is not None:  # f takes the image and its label planes: C+K channels
            model_shape = (self.sample_shape[0] + self.num_classes, *self.sample_shape[1:])
        if model is None:
            self.model, self.model_record = build_model_for(
                c, model_shape, out_channels=self.sample_shape[0] if self.num_classes is not None else None)
        elif isinstance(model, torch.nn.Module):
            self.model, self.model_record = model, record_for(model, kwargs=model_kwargs)
        else:
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
        if self.num_classes is not None:
            self.model, self.model_record = conditioned_model(self.model, self.model_record, self.num_classes,
                                                              self.sample_shape[0])
        if c.sync_batchnorm and self.dist.enabled:
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.model = self.model.to(self.device)
        self.model_dtype = next(iter(self.model.parameters()), torch.empty(0)).dtype
        fit_sample = sample[:2].to(self.device, self.model_dtype)
        if self.num_classes is not None:
            fit_sample = condition(fit_sample, torch.zeros(fit_sample.shape[0], dtype=torch.int64),
                                   self.num_classes)
        what = "data samples"
        if self.num_classes is not None:
            what = (f"--conditional inputs ({self.sample_shape[0]} image + {self.num_classes} label channels; "
                    f"build the model for {self.sample_shape[0] + self.num_classes} input channels)")
        check_model_fits(self.model, fit_sample, what)
        self.dist.broadcast_module(self.model)  # identical replicas, whatever each rank's RNG did
        # fitted on every rank alike: the same seeded data sample, and a deterministic fit on the CPU
        kinds = dict.fromkeys((c.prior, c.sample_prior or c.prior))  # one prior where both are the same
        if "mixture" in kinds and sample.shape[0] < c.prior_components:
            raise ValueError(f"prior_components must be at most the number of data samples the mixture is fitted "
                             f"to ({sample.shape[0]}), got {c.prior_components}")
        priors = {kind: build_prior(kind, data=sample, shape=self.sample_shape, components=c.prior_components,
                                    rank=c.prior_rank) for kind in kinds}
        self.prior = priors[c.prior]
        # what sampling draws from: the grids here, and (saved with the run) ign-fast sample, eval and export
        self.sample_prior = priors[c.sample_prior or c.prior]
        self.ema = EMA(self.model, c.ema_decay) if c.ema_decay is not None else None
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=c.lr, betas=(c.beta1, c.beta2))
        # one noise stream for all ranks (seed + 1, as single-process runs have always used): each rank takes
        # its slice of the global draw, so the run is the same at any world size
        self.noise_generator = torch.Generator().manual_seed(c.seed + 1)
        self.amp = c.amp == "bf16" or (c.amp == "auto" and self.device.type == "cuda")
        # a conditional run's terms are means over C+K channels, K of them label planes that add 0: scaled
        # back so its λ, loss and logged terms mean what an unconditional run's do (build_step)
        image_channels = self.sample_shape[0] if self.num_classes is not None else None
        self.term_scale = 1.0 if image_channels is None else (image_channels + self.num_classes) / image_channels
        self.step_fn = build_step(c, self.model, self.optimizer, self.sample_noise, self.device,
                                  torch.bfloat16 if self.amp else None, loss_scale=self.term_scale,
                                  image_channels=image_channels)
        if self.dist.enabled:
            self.step_fn.grad_sync = distributed.GradientAverager(self.model.parameters(), world)
            if isinstance(self.step_fn, NAIGNStep):
                self.step_fn.candidate_gather = distributed.CandidateGather(self.dist.rank, world)
        self.step = 0
        self.nonfinite_in_a_row = self.nonfinite_total = 0
        # no rank may write into out before every rank has looked at it (check_run_folder above)
        self.dist.barrier()
        if overwrite and self.dist.is_main:
            clear_run_outputs(c.out)
        os.makedirs(c.out, exist_ok=True)
        resume_step = None
        if resume:
            resume_step = self._load(c.out)
        self.metrics = None
        if self.dist.is_main:  # logs, samples and checkpoints come from rank 0 only
            self.metrics = MetricsLog(os.path.join(c.out, "metrics.csv"), resume_step if resume else None)
            with open(os.path.join(c.out, "config.json"), "w") as f:
                json.dump(dataclasses.asdict(c), f, indent=2)

    def _data_source(self, data):
        """(source, labels): the tensor or Dataset the run trains on (data as given, or the config's data set)
        and a tensor source's labels, or None where it has none (a Dataset's labels come with its items)."""
        c = self.config
        if data is not None:
            if (isinstance(data, (tuple, list)) and len(data) == 2
                    and all(isinstance(t, torch.Tensor) for t in data)):
                return data[0], data[1]
            if isinstance(data, torch.Tensor) or isinstance(data, torch.utils.data.Dataset):
                return data, None
            raise TypeError(f"data must be a tensor [N, ...], an (images, labels) pair of tensors or a map-style "
                            f"torch.utils.data.Dataset, got {type(data).__name__}")
        if c.data == "images":  # streamed from disk: memory does not grow with the number of files
            dataset = ImageFolderDataset(c.data_root, size=c.image_size or 64, channels=3)
            if dataset.skipped and self.dist.is_main:
                print(f"ign-fast: {dataset.skipped_summary()}", file=sys.stderr)
            return dataset, None
        return load_dataset(c.data, root=c.data_root, split="train", size=c.image_size, seed=c.seed)

    def sample_noise(self, n):
        # drawn on the CPU from the trainer's own generator, so a resumed run draws the same numbers
        z = self.prior.sample(n, generator=self.noise_generator)
        if self.num_classes is not None:  # z̃ = cat(z, planes): every class equally often (NAIGN's pool too)
            z = condition(z, balanced_labels(n, self.num_classes, self.noise_generator), self.num_classes)
        return z.to(self.device)

    def _meta(self):
        # the loader position counts global batches (every rank takes one shard of each), so it holds at
        # any world size as long as the global batch_size is the same
        return {"config": dataclasses.asdict(self.config), "model_config": self.model_record,
                "sample_shape": list(self.sample_shape), "ema_updates": self.ema.updates if self.ema else None,
                "prior_config": self.prior.to_config(), "loader": self.loader.state_dict(),
                **({"sample_prior_config": self.sample_prior.to_config()} if self._own_sample_prior() else {}),
                "naign_calls": getattr(self.step_fn, "calls", 0), "world_size": self.dist.world_size,
                "global_batch_size": self.config.batch_size, "data_border_mean": self.data_border_mean,
                "conditional": self.num_classes is not None, "num_classes": self.num_classes}

    def _own_sample_prior(self):
        return self.sample_prior is not self.prior

    def _rng_states(self):
        """The shared noise stream, and NAIGN's global pool and candidates: the same on every rank, so rank 0's."""
        states = {"torch_cpu": torch.get_rng_state(), "noise_generator": self.noise_generator.get_state()}
        pool = getattr(self.step_fn, "pool", None)
        if pool is not None:
            states["naign_pool"] = pool.detach().cpu()
        candidates = getattr(self.step_fn, "candidates", None)
        if candidates is not None and self.config.refresh_every > 1:  # searched again until the next refresh
            states["naign_candidates"] = candidates.detach().cpu()
        return states

    def save(self):
        """Every rank calls this; rank 0 writes the checkpoint, the others wait for it."""
        path = None
        if self.dist.is_main:
            path = ckpt.save_checkpoint(self.config.out, self.step, model=self.model, optimizer=self.optimizer,
                                        prior=self.prior, meta=self._meta(), rng_states=self._rng_states(),
                                        keep=self.config.keep, ema=self.ema.state_dict() if self.ema else None,
                                        sample_prior=self.sample_prior if self._own_sample_prior() else None)
        # no rank runs on (or exits, or resumes) before the checkpoint is complete on disk
        self.dist.barrier()
        return path

    def _load(self, run_dir):
        try:
            state = ckpt.load_checkpoint(run_dir)
        except ckpt.CheckpointError:
            root = os.path.join(run_dir, "checkpoints")
            # nothing to resume: a fresh run (also after a crash inside the very first save, which leaves
            # only a temporary folder behind)
            if not os.path.isdir(root) or not any(n.startswith("step_") or n == ckpt.LATEST for n in os.listdir(root)):
                return None
            raise
        meta = state["meta"]
        changes = resumed_setting_changes(meta.get("config") or {}, self.config)
        if meta["model_config"] != self.model_record:
            raise ckpt.CheckpointError(f"checkpoint model {meta['model_config']} does not match the run's "
                                       f"model {self.model_record}")
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as error:  # a model given as an object: its record may not show the difference
            raise ckpt.CheckpointError(f"checkpoint weights do not fit the run's model "
                                       f"({str(error).strip().splitlines()[0]})") from None
        if self.ema is not None:
            if state["ema"] is not None:
                self.ema.load_state_dict(state["ema"], updates=meta.get("ema_updates") or 0)
            else:  # EMA switched on at resume: the average starts from the resumed weights
                self.ema = EMA(self.model, self.config.ema_decay)
        self.prior.load_state_dict(state["prior"])
        if self._own_sample_prior() and state.get("sample_prior") is not None:
            self.sample_prior.load_state_dict(state["sample_prior"])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # the config's, not the saved ones: a changed lr or beta applies
            group["lr"] = self.learning_rate(int(meta["step"]))
            group["betas"] = (self.config.beta1, self.config.beta2)
        saved_batch = meta.get("global_batch_size", self.config.batch_size)
        if saved_batch != self.config.batch_size:
            raise ckpt.CheckpointError(f"resume needs the checkpoint's global batch_size {saved_batch} (its data "
                                       f"position counts such batches), got {self.config.batch_size}")
        loader_state = dict(meta["loader"])
        if loader_state["position"] > self.loader.batches_per_epoch:
            # another world size can round the epoch's batch count down by one: that epoch is done
            loader_state = {"epoch": loader_state["epoch"] + 1, "position": 0}
        self.loader.load_state_dict(loader_state)
        rng = state["rng"]
        # every rank continues the one shared stream (checkpoints written before it was shared also carry
        # other ranks' streams, "noise_generator_rank<r>": not used)
        self.noise_generator.set_state(rng["noise_generator"])
        torch.set_rng_state(rng["torch_cpu"])
        if isinstance(self.step_fn, NAIGNStep):
            self.step_fn.calls = meta.get("naign_calls", 0)
            pool, candidates = rng.get("naign_pool"), rng.get("naign_candidates")
            # a pool saved at another world size, or by a run whose ranks kept their own pools, is redrawn
            if pool is not None and pool.shape[0] == self.config.candidates * self.config.batch_size:
                self.step_fn.pool = pool.to(self.device)
                if candidates is not None and candidates.shape == pool.shape:
                    self.step_fn.candidates = candidates.to(self.device)
        self.step = int(meta["step"])
        if changes and self.dist.is_main:
            print("ign-fast: resume: " + ", ".join(f"{field} {old!r} -> {new!r}" for field, old, new in changes)
                  + " (the saved run's -> this one's, from here on)", file=sys.stderr)
        return self.step

    def _count_nonfinite(self, skipped):
        """Count a skipped step; raise NonFiniteTrainingError at max_nonfinite_steps in a row."""
        if not skipped:
            self.nonfinite_in_a_row = 0
            return
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        limit = self.config.max_nonfinite_steps
        if self.dist.is_main:
            print(f"ign-fast: step {self.step}: loss is not finite, update skipped ({self.nonfinite_in_a_row} in "
                  f"a row, limit {limit})", file=sys.stderr)
        if self.nonfinite_in_a_row >= limit:
            try:
                last_good = ckpt.resolve_checkpoint(self.config.out)
            except ckpt.CheckpointError:
                last_good = "none written yet"
            raise NonFiniteTrainingError(f"training stopped at step {self.step}: {self.nonfinite_in_a_row} steps "
                                         f"in a row had a non-finite loss (max_nonfinite_steps={limit}); last "
                                         f"good checkpoint: {last_good}")

    def learning_rate(self, step):
        """The learning rate of update number step + 1: a function of the step alone, so resume is exact."""
        c = self.config
        if c.lr_schedule == "cosine":
            return c.lr * 0.5 * (1.0 + math.cos(math.pi * min(step / c.steps, 1.0)))
        return c.lr

    def tightness_weight(self, step):
        """λ_tight of update number step + 1 under tight_warmup (a function of the step alone, so resume is
        exact); unscaled, as the config gives it."""
        c = self.config
        if c.tight_warmup <= 0:
            return c.lambda_tight
        progress = step / c.tight_warmup
        if c.tight_warmup_shape == "exp":
            return c.lambda_tight * (1.0 - math.exp(-5.0 * progress))
        return c.lambda_tight * min(progress, 1.0)

    def train_step(self):
        c = self.config
        if c.lr_schedule != "constant":
            for group in self.optimizer.param_groups:
                group["lr"] = self.learning_rate(self.step)
        if c.tight_warmup > 0:
            self.step_fn.loss.lambda_tight = self.tightness_weight(self.step) * self.term_scale
        batch = self.loader.next_batch()
        x = batch[0] if self.num_classes is not None else batch
        x = x.to(self.device, non_blocking=True)
        x = to_model_range(x).to(self.model_dtype)  # uint8 pixels travel as bytes, then become [-1, 1] floats
        if self.num_classes is not None:  # x̃ = cat(x, label planes), built on the device
            x = condition(x, batch[1].to(self.device, non_blocking=True), self.num_classes)
        if isinstance(self.step_fn, IGNStep):  # the global batch's noise, this rank's contiguous slice of it
            n, rank = x.shape[0], self.dist.rank
            out = self.step_fn(x, self.sample_noise(n * self.dist.world_size)[rank * n:(rank + 1) * n])
        else:
            out = self.step_fn(x)
        if self.term_scale != 1.0:  # the image's own distances (the total is already in those units)
            out = {k: v if k == "loss" else v * self.term_scale for k, v in out.items()}
        if self.ema is not None and not self.step_fn.last_skipped:
            self.ema.update(self.model)
        self.step += 1
        return out

    def write_samples(self, path, n=64):
        """A grid of f(z) for a fixed z, with the EMA weights when the run keeps them (what sampling uses). A
        conditional run's grid has one row per class, 10 samples each."""
        per_row = int(math.sqrt(n))
        if self.num_classes is not None:
            per_row, n = 10, 10 * self.num_classes
        with torch.no_grad():
            z = self.sample_prior.sample(n, generator=torch.Generator().manual_seed(1234)).to(self.device)
            if self.num_classes is not None:
                z = condition(z, torch.arange(n) // per_row, self.num_classes)
            if self.ema is not None:
                with self.ema.applied(self.model):
                    fz = generate(self.model, z)
            else:
                fz = generate(self.model, z)
        if self.num_classes is not None:
            fz = fz[:, :self.sample_shape[0]]
        if fz.dim() == 4:
            save_image_grid(fz.float().cpu(), path, nrow=per_row)
        return path

    def fit(self, steps=None):
        c = self.config
        total = steps if steps is not None else c.steps
        main = self.dist.is_main
        writer = _tensorboard(c.out) if main else None
        bar, lines = None, False
        if c.progress is not False and main:
            # a bar only where a person watches it; in a piped log its carriage-return frames make one
            # unreadable line, so a log gets a plain line every log_every steps instead
            wants_bar = c.progress in (True, "auto") and _is_terminal(sys.stderr)
            lines = not wants_bar or not _is_terminal(sys.stdout)
            if wants_bar:
                from tqdm import tqdm

                bar = tqdm(total=total, initial=self.step, dynamic_ncols=True, desc=c.objective)
        start, start_step = time.perf_counter(), self.step
        save_due = False
        self.model.train()
        try:
            while self.step < total:
                out = self.train_step()
                skipped = bool(self.step_fn.last_skipped)
                self._count_nonfinite(skipped)
                if main and (self.step % c.log_every == 0 or self.step == total):
                    rate = (self.step - start_step) / max(time.perf_counter() - start, 1e-9)
                    self.metrics.append({"step": self.step, **{k: f"{v:.6g}" for k, v in out.items()}})
                    if writer is not None:
                        for k, v in out.items():
                            writer.add_scalar(k, v, self.step)
                    if bar is not None:
                        bar.set_postfix({k: f"{v:.4g}" for k, v in out.items()} | {"it/s": f"{rate:.1f}"})
                    if lines:
                        print(progress_line(self.step, total, out, rate), flush=True)
                if bar is not None:
                    bar.update(1)
                if main and (self.step % c.sample_every == 0 or self.step == total):
                    self.write_samples(os.path.join(c.out, "samples", f"step_{self.step:08d}.png"))
                save_due = save_due or self.step % c.checkpoint_every == 0 or self.step == total
                if save_due and not skipped:  # a due checkpoint waits for the next finite step
                    self.save()
                    save_due = False
        finally:
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
        rows = self.metrics.rows if self.metrics is not None else []
        return {"steps": self.step, "start_step": start_step, "target": total,
                "seconds": time.perf_counter() - start, "last": rows[-1] if rows else {},
                "nonfinite_steps": self.nonfinite_total}

    def close(self):
        """Leave the process group (under torchrun); the trainer's files stay usable."""
        self.dist.destroy()


def train(config, resume=False, overwrite=False):
    trainer = None
    try:
        trainer = Trainer(config, resume=resume, overwrite=overwrite)
        summary = trainer.fit()
    except BaseException:
        if trainer is not None:
            trainer.close()
        raise
    summary["run"] = config.out
    return trainer, summary
