"""Trains an IGN or NAIGN model on a data set, with checkpoints, sample grids, a metrics CSV and exact
resume (on CPU a resumed run's losses equal an uninterrupted run's)."""
import csv
import dataclasses
import json
import math
import os
import time

import torch

from . import checkpoint as ckpt
from .data import InMemoryLoader, load_dataset
from .images import save_image_grid
from .inference import generate
from .models import build_model
from .naign import NAIGNLoss, NAIGNStep
from .noise import build_prior
from .objectives import IGNLoss
from .step import IGNStep


@dataclasses.dataclass
class TrainConfig:
    objective: str = "naign"          # "ign" (Shocher et al.) or "naign" (reconstruction + IMLE)
    data: str = "mnist5k"
    data_root: str | None = None
    image_size: int | None = None
    model: str = "dcgan28"
    norm: str = "group"
    latent_dim: int = 64
    width: int = 32
    steps: int = 2000
    batch_size: int | None = None     # None: 256 for ign, 64 for naign
    lr: float | None = None           # None: 1e-4 for ign, 5e-4 for naign
    beta1: float = 0.5
    beta2: float = 0.999
    distance: str = "l1"
    lambda_rec: float | None = None   # None: 20 for ign, 1 for naign
    lambda_idem: float | None = None  # None: 20 for ign, 0 for naign
    lambda_tight: float = 2.5
    tight_clamp_ratio: float | None = 1.5
    lambda_imle: float = 1.0
    candidates: int = 8
    refresh_every: int = 1
    prior: str = "gaussian"
    step_mode: str = "auto"
    device: str = "auto"
    amp: str = "auto"                 # "bf16" autocast on GPU, "none"; auto: bf16 on CUDA, none on CPU
    seed: int = 0
    out: str = "runs/ign"
    log_every: int = 10
    sample_every: int = 500
    checkpoint_every: int = 500
    keep: int = 3
    progress: bool = True

    def resolved(self):
        """A copy with every None default replaced by the objective's own default."""
        ign = self.objective == "ign"
        c = dataclasses.replace(self)
        c.batch_size = c.batch_size or (256 if ign else 64)
        c.lr = c.lr if c.lr is not None else (1e-4 if ign else 5e-4)
        c.lambda_rec = c.lambda_rec if c.lambda_rec is not None else (20.0 if ign else 1.0)
        c.lambda_idem = c.lambda_idem if c.lambda_idem is not None else (20.0 if ign else 0.0)
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

    choices = {"objective": ("ign", "naign"), "data": DATASET_NAMES, "model": MODEL_NAMES,
               "norm": ("batch", "group", "none"), "distance": ("l1", "l2"), "prior": PRIOR_KINDS,
               "step_mode": ("auto", "reference", "fused", "graph"), "amp": ("auto", "bf16", "none")}
    for name, allowed in choices.items():
        if getattr(c, name) not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(map(str, allowed))}; got {getattr(c, name)!r}")
    for name in ("steps", "batch_size", "latent_dim", "width", "log_every", "sample_every", "checkpoint_every",
                 "keep", "candidates", "refresh_every"):
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    for name in ("lr", "lambda_rec", "lambda_idem", "lambda_tight", "lambda_imle"):
        value = getattr(c, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if c.lr <= 0:
        raise ValueError(f"lr must be > 0, got {c.lr!r}")
    if c.tight_clamp_ratio is not None and not c.tight_clamp_ratio > 0:
        raise ValueError(f"tight_clamp_ratio must be > 0 or None, got {c.tight_clamp_ratio!r}")
    resolve_device(c.device)


def build_model_for(config, sample_shape):
    """The model named in config, sized for data of per-sample shape sample_shape."""
    if config.model == "mlp":
        if len(sample_shape) != 1:
            raise ValueError(f"model 'mlp' needs vector data, got samples of shape {tuple(sample_shape)}")
        return build_model("mlp", dim=sample_shape[0])
    expected = {"dcgan28": 28, "dcgan64": 64}[config.model]
    if len(sample_shape) != 3 or sample_shape[1] != expected or sample_shape[2] != expected:
        raise ValueError(f"model {config.model!r} needs images of {expected}x{expected}, got samples of shape "
                         f"{tuple(sample_shape)}")
    return build_model(config.model, in_channels=sample_shape[0], latent_dim=config.latent_dim,
                       width=config.width, norm=config.norm)


def build_step(config, model, optimizer, sample_noise, device, amp_dtype):
    if config.objective == "ign":
        loss = IGNLoss(config.distance, config.lambda_rec, config.lambda_idem, config.lambda_tight,
                       config.tight_clamp_ratio)
        mode = config.step_mode
        if mode == "auto":  # the whole update as a CUDA graph on GPU; on CPU the fused step
            mode = "graph" if device.type == "cuda" else "fused"
        return IGNStep(model, optimizer, loss=loss, mode=mode, amp_dtype=amp_dtype)
    loss = NAIGNLoss(config.distance, config.lambda_rec, config.lambda_imle, config.lambda_idem,
                     config.candidates, config.refresh_every)
    return NAIGNStep(model, optimizer, loss=loss, sample_noise=sample_noise, amp_dtype=amp_dtype)


class MetricsLog:
    """metrics.csv in the run folder; on resume, rows past the checkpoint's step are dropped first."""

    def __init__(self, path, resume_step=None):
        self.path = path
        self.rows = []
        if resume_step is not None and os.path.exists(path):
            with open(path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
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


class Trainer:
    def __init__(self, config, resume=False):
        self.config = config.resolved()
        validate_config(self.config)
        c = self.config
        self.device = resolve_device(c.device)
        torch.manual_seed(c.seed)
        self.data, self.labels = load_dataset(c.data, root=c.data_root, split="train", size=c.image_size,
                                              seed=c.seed)
        self.model = build_model_for(c, tuple(self.data.shape[1:])).to(self.device)
        self.prior = build_prior(c.prior, data=self.data, shape=tuple(self.data.shape[1:]))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=c.lr, betas=(c.beta1, c.beta2))
        self.loader = InMemoryLoader(self.data, c.batch_size, seed=c.seed)
        self.noise_generator = torch.Generator().manual_seed(c.seed + 1)
        self.amp = c.amp == "bf16" or (c.amp == "auto" and self.device.type == "cuda")
        self.step_fn = build_step(c, self.model, self.optimizer, self.sample_noise, self.device,
                                  torch.bfloat16 if self.amp else None)
        self.step = 0
        os.makedirs(c.out, exist_ok=True)
        resume_step = None
        if resume:
            resume_step = self._load(c.out)
        self.metrics = MetricsLog(os.path.join(c.out, "metrics.csv"), resume_step if resume else None)
        with open(os.path.join(c.out, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(c), f, indent=2)

    def sample_noise(self, n):
        # drawn on the CPU from the trainer's own generator, so a resumed run draws the same numbers
        return self.prior.sample(n, generator=self.noise_generator).to(self.device)

    def _meta(self):
        return {"config": dataclasses.asdict(self.config), "model_config": self.model.config,
                "prior_config": self.prior.to_config(), "loader": self.loader.state_dict(),
                "naign_calls": getattr(self.step_fn, "calls", 0)}

    def _rng_states(self):
        states = {"noise_generator": self.noise_generator.get_state(), "torch_cpu": torch.get_rng_state()}
        pool = getattr(self.step_fn, "pool", None)
        if pool is not None:
            states["naign_pool"] = pool
        return states

    def save(self):
        return ckpt.save_checkpoint(self.config.out, self.step, model=self.model, optimizer=self.optimizer,
                                    prior=self.prior, meta=self._meta(), rng_states=self._rng_states(),
                                    keep=self.config.keep)

    def _load(self, run_dir):
        try:
            state = ckpt.load_checkpoint(run_dir)
        except ckpt.CheckpointError:
            if not os.path.isdir(os.path.join(run_dir, "checkpoints")):
                return None  # nothing to resume: a fresh run
            raise
        meta = state["meta"]
        if meta["model_config"] != self.model.config:
            raise ckpt.CheckpointError(f"checkpoint model {meta['model_config']} does not match the run's "
                                       f"model {self.model.config}")
        self.model.load_state_dict(state["model"])
        self.prior.load_state_dict(state["prior"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.loader.load_state_dict(meta["loader"])
        self.noise_generator.set_state(state["rng"]["noise_generator"])
        torch.set_rng_state(state["rng"]["torch_cpu"])
        if isinstance(self.step_fn, NAIGNStep):
            self.step_fn.calls = meta.get("naign_calls", 0)
            if "naign_pool" in state["rng"]:
                self.step_fn.pool = state["rng"]["naign_pool"].to(self.device)
        self.step = int(meta["step"])
        return self.step

    def train_step(self):
        x = self.loader.next_batch().to(self.device, non_blocking=True)
        if isinstance(self.step_fn, IGNStep):
            out = self.step_fn(x, self.sample_noise(x.shape[0]))
        else:
            out = self.step_fn(x)
        self.step += 1
        return out

    def write_samples(self, path, n=64):
        with torch.no_grad():
            z = self.prior.sample(n, generator=torch.Generator().manual_seed(1234)).to(self.device)
            fz = generate(self.model, z)
        if fz.dim() == 4:
            save_image_grid(fz.float().cpu(), path, nrow=int(math.sqrt(n)))
        return path

    def fit(self, steps=None):
        c = self.config
        total = steps if steps is not None else c.steps
        writer = _tensorboard(c.out)
        bar = None
        if c.progress:
            from tqdm import tqdm

            bar = tqdm(total=total, initial=self.step, dynamic_ncols=True, desc=c.objective)
        start, start_step = time.perf_counter(), self.step
        self.model.train()
        while self.step < total:
            out = self.train_step()
            if self.step % c.log_every == 0 or self.step == total:
                rate = (self.step - start_step) / max(time.perf_counter() - start, 1e-9)
                self.metrics.append({"step": self.step, **{k: f"{v:.6g}" for k, v in out.items()}})
                if writer is not None:
                    for k, v in out.items():
                        writer.add_scalar(k, v, self.step)
                if bar is not None:
                    bar.set_postfix({k: f"{v:.4g}" for k, v in out.items()} | {"it/s": f"{rate:.1f}"})
            if bar is not None:
                bar.update(1)
            if self.step % c.sample_every == 0 or self.step == total:
                self.write_samples(os.path.join(c.out, "samples", f"step_{self.step:08d}.png"))
            if self.step % c.checkpoint_every == 0 or self.step == total:
                self.save()
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        return {"steps": self.step, "seconds": time.perf_counter() - start, "last": self.metrics.rows[-1]
                if self.metrics.rows else {}}


def train(config, resume=False):
    trainer = Trainer(config, resume=resume)
    summary = trainer.fit()
    summary["run"] = config.out
    return trainer, summary
