"""Using a trained f: load it from a checkpoint, generate f^n(z), project inputs with f^n.

Normalisation at inference: a BatchNorm model is applied with batch statistics (train-mode normalisation,
its running statistics left untouched), because the IGN step trains every call with batch statistics and
eval-mode sampling measured worse (see the foundation issue's notes); other models run in eval mode.
"""
import torch
from torch.func import functional_call

from .checkpoint import SAMPLE_PRIOR_FILE, CheckpointError, load_checkpoint
from .noise import build_prior


def uses_batch_statistics(model):
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def apply_f(model, y, steps=1):
    """f^steps(y) under the inference normalisation policy above."""
    if uses_batch_statistics(model):
        was_training = model.training
        model.train()
        state = {k: v.detach() for k, v in model.named_parameters()}
        state.update({k: v.clone() for k, v in model.named_buffers()})
        for _ in range(steps):
            y = functional_call(model, state, (y,))
        model.train(was_training)
        return y
    was_training = model.training
    model.eval()
    for _ in range(steps):
        y = model(y)
    model.train(was_training)
    return y


def generate(model, z, steps=1):
    return apply_f(model, z, steps)


def _rebuild(state, where, model=None, trust_model_code=False, ema=True, training_prior=False):
    """(model, prior, trained_on) from a checkpoint's state: prior is what generation draws from, the run's
    sample prior where it has one (--sample-prior), else, or with training_prior, its training prior, which is
    trained_on (restore's latent starts: the noise f was trained on). CheckpointError
    (one line) when its meta or weights do not describe a model: a hand-edited meta.json or another program's
    checkpoint must not end in a KeyError.

    The model is rebuilt from the checkpoint's record (a built-in model's config, or an import path and JSON
    kwargs: ign_fast.model_record), or taken as given (model=, for a class that cannot be imported by its
    path), then given the checkpoint's weights: the EMA of the weights when the run kept one and ema is True."""
    from .model_record import ModelRecordError, rebuild

    meta = state["meta"]
    missing = [k for k in ("model_config", "prior_config") if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise CheckpointError(f"checkpoint {where} is not an ign_fast model checkpoint: its meta lacks "
                              f"{' and '.join(missing)}")
    if model is not None and not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
    record = meta["model_config"]
    if model is not None and isinstance(record, dict) and isinstance(record.get("conditional"), dict):
        from .conditional import LabelConditioned

        if not isinstance(model, LabelConditioned):  # the user's base module: wrapped as the run trained it
            spec = record["conditional"]
            model = LabelConditioned(model, spec.get("num_classes"), spec.get("image_channels"))
    try:
        if model is None:
            model = rebuild(meta["model_config"], trust_model_code)
        weights = state.get("ema") if ema and state.get("ema") is not None else state["model"]
        model.load_state_dict(weights)
        trained_on = prior = build_prior(meta["prior_config"], state_dict=state["prior"])
        if meta.get("sample_prior_config") is not None and not training_prior:  # it generates from another prior
            if state.get("sample_prior") is None:
                raise ValueError(f"its meta names a sample prior but {SAMPLE_PRIOR_FILE} is missing")
            prior = build_prior(meta["sample_prior_config"], state_dict=state["sample_prior"])
    except ModelRecordError as error:
        raise CheckpointError(f"checkpoint {where}: {error}") from None
    except (TypeError, ValueError, KeyError, RuntimeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"checkpoint {where} does not describe a loadable model ({first})") from None
    return model, prior, trained_on


def load_trained(path, device="cpu", model=None, trust_model_code=False, ema=True, training_prior=False):
    """(model, prior, meta) from a run folder or checkpoint folder, on device, in eval mode. prior: what the run
    generates from (its sample prior, where it has one); with training_prior, the one it trained from."""
    state = load_checkpoint(path)
    model, prior, _ = _rebuild(state, repr(state["folder"]), model, trust_model_code, ema, training_prior)
    return model.to(device).eval(), prior, state["meta"]


# How far outside [-1, 1] an image may reach: noise on an image is a fair input to project (0.5-sigma noise
# stays inside this with overwhelming odds), [0, 255] pixels are a wrong scale
IMAGE_RANGE_SLACK = 3.0


def _as_batch(tensor, shape, name, images=False):
    """[*shape] or [B, *shape] -> [B, *shape] float32 tensor (the dtype of ign_fast's models and exports, so
    float64 or bfloat16 inputs work too); ValueError naming the argument for another shape, NaN or inf, or
    (images=True, image models) values far outside [-1, 1]."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tuple(tensor.shape) == tuple(shape):
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != len(shape) + 1 or tuple(tensor.shape[1:]) != tuple(shape):
        raise ValueError(f"{name} must have shape [B, {', '.join(map(str, shape))}] or "
                         f"[{', '.join(map(str, shape))}], got {list(tensor.shape)}")
    if not tensor.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor (images in [-1, 1]), got {tensor.dtype}")
    if tensor.numel() == 0:
        return tensor.to(torch.float32)
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contains NaN or inf")
    if images and len(shape) == 3:
        low, high = float(tensor.min()), float(tensor.max())
        if low < -1 - IMAGE_RANGE_SLACK or high > 1 + IMAGE_RANGE_SLACK:
            raise ValueError(f"{name} must be images in [-1, 1] (noise on top is fine), got values in "
                             f"[{low:.4g}, {high:.4g}]: scale pixels p in [0, 255] as p / 127.5 - 1")
    return tensor.to(torch.float32)


def _check_positive(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def slerp(a, b, t):
    """Spherical blend of [B, ...] a and b per sample at t in [0, 1] (t: [T]) -> [T, B, ...]. Gaussian noise in
    high dimension lives near a sphere; a straight line between two draws passes through the low-norm interior
    that f never saw, a great-circle arc does not. Falls back to a linear blend for (anti)parallel pairs."""
    flat_a, flat_b = a.flatten(1).double(), b.flatten(1).double()
    cos = (flat_a * flat_b).sum(1) / (flat_a.norm(dim=1) * flat_b.norm(dim=1)).clamp_min(1e-12)
    omega = torch.acos(cos.clamp(-1, 1))  # [B]
    sin = torch.sin(omega)
    t = t.double().view(-1, 1)  # [T, 1]
    safe = sin.abs() > 1e-6
    wa = torch.where(safe, torch.sin((1 - t) * omega) / torch.where(safe, sin, 1.0), 1 - t)
    wb = torch.where(safe, torch.sin(t * omega) / torch.where(safe, sin, 1.0), t)
    blend = wa.unsqueeze(-1) * flat_a + wb.unsqueeze(-1) * flat_b  # [T, B, D]
    return blend.to(a.dtype).view(t.shape[0], *a.shape)


class Projector:
    """A trained f ready to use: generate, project, interpolate, do latent arithmetic, score drift.

    Load with Projector.load(path): a run folder, a checkpoint folder, a checkpoint dict from
    ign_fast.checkpoint.load_checkpoint, or a TorchScript file written by export_projector. All methods run
    under the inference normalisation policy of this module (BatchNorm with batch statistics: a sample's output
    then depends on the rest of its batch). Tensors are images (or vectors) in the model's input space; noise
    z is the prior's output (image-shaped), which is what f takes as input.

    A class-conditional run (`num_classes` set; ign_fast.conditional) takes a label per sample: generate(n,
    labels=...) (labels default to 0, 1, ..., K-1, 0, ... so a grid shows every class), and project,
    interpolate, arithmetic and distance require labels= (the label is part of f's input: there is no right
    default for an image). restore is not offered for such a run. Tensors stay image-shaped ([C, H, W]); the
    label planes are added inside.
    """

    def __init__(self, apply, sample_noise, noise_to_input, input_shape, prior_kind, source, num_classes=None):
        self._apply_f = apply                  # (y, steps, labels) -> f^steps(y); labels None when unconditional
        self._sample_noise = sample_noise      # (n, seed) -> standard normal eps
        self._noise_to_input = noise_to_input  # eps -> z
        self.input_shape = tuple(input_shape)
        self.prior_kind = prior_kind           # "gaussian", "fourier", "mixture" or "none"
        self.source = source                   # "checkpoint" or "torchscript"
        self.taught = ()                       # corruptions f was trained to undo (set from a run's config)
        self.num_classes = num_classes         # K for a class-conditional run, else None

    def _labels(self, labels, n, required=True):
        """labels checked against this projector: an int64 [n] tensor for a conditional run (None: an error
        when required, else 0, 1, ..., K-1, 0, ...), None for an unconditional one (labels given: an error)."""
        from .conditional import check_labels, cycling_labels

        if self.num_classes is None:
            if labels is not None:
                raise ValueError("labels is only for a class-conditional run (trained with --conditional); this "
                                 "one is unconditional")
            return None
        if labels is None:
            if required:
                raise ValueError(f"labels must be given for this class-conditional run: one class in "
                                 f"0..{self.num_classes - 1} per image (an int, a list or a tensor)")
            return cycling_labels(n, self.num_classes)
        return check_labels(labels, self.num_classes, n)

    def _apply(self, y, steps, labels=None):
        return self._apply_f(y, steps, labels)

    @classmethod
    def load(cls, path_or_checkpoint, device="cpu", model=None, trust_model_code=False, ema=True):
        """model: the trained module's architecture, for a run whose model class cannot be rebuilt from its
        import path (defined in __main__, or trained without model_kwargs); its weights are replaced by the
        checkpoint's. trust_model_code: allow a record naming a factory function (see model_record). ema: the
        averaged weights when the run kept them (--ema-decay), else the trained ones."""
        import os

        from .export import load_torchscript

        options = (model, trust_model_code, ema)
        if isinstance(path_or_checkpoint, dict):
            return cls._from_checkpoint_state(path_or_checkpoint, device, *options)
        if not isinstance(path_or_checkpoint, (str, os.PathLike)):
            raise TypeError(f"path_or_checkpoint must be a path or a checkpoint dict, got "
                            f"{type(path_or_checkpoint).__name__}")
        path = os.fspath(path_or_checkpoint)
        if os.path.isdir(path):
            return cls._from_checkpoint_state(load_checkpoint(path), device, *options)
        if not os.path.exists(path):
            raise ValueError(f"path_or_checkpoint {path!r} does not exist")
        if path.endswith((".pt2", ".onnx")):
            raise ValueError(f"path_or_checkpoint {path!r} is a torch.export/ONNX file: load it with "
                             "torch.export.load or onnxruntime (Projector reads folders and TorchScript files)")
        module, metadata = load_torchscript(path, map_location=device)

        def apply(y, steps, labels=None):
            with torch.no_grad():
                if labels is None:
                    return module(y.to(device), steps)
                return module(y.to(device), labels.to(device), steps)

        def noise_to_input(eps):
            with torch.no_grad():
                return module.noise_to_input(eps.to(device))

        projector = cls(apply, module.sample_noise, noise_to_input, metadata["input_shape"], metadata["prior"],
                        "torchscript", num_classes=metadata.get("num_classes"))
        projector.module = module  # restore(method="latent") differentiates through it
        return projector

    @classmethod
    def _from_checkpoint_state(cls, state, device, model=None, trust_model_code=False, ema=True):
        missing = [k for k in ("meta", "model", "prior") if k not in state]
        if missing:
            raise ValueError(f"path_or_checkpoint dict lacks {', '.join(missing)} (use load_checkpoint)")
        meta = state["meta"]
        if not isinstance(meta, dict) or "model_config" not in meta or "prior_config" not in meta:
            raise ValueError("path_or_checkpoint dict's meta lacks model_config or prior_config")
        model, prior, trained_on = _rebuild(state, repr(state.get("folder", "dict")), model, trust_model_code, ema)
        model = model.to(device).eval()

        def sample_noise(n, seed=None):
            # Every prior draws from standard normal eps of its noise shape; drawing z directly with
            # prior.sample keeps eager results identical to those of the training code. projector.prior, read at
            # the call: set_prior changes it.
            generator = torch.Generator().manual_seed(seed) if seed is not None else None
            return projector.prior.sample(n, generator=generator).to(device)

        from .conditional import LabelConditioned, apply_conditioned

        conditional = isinstance(model, LabelConditioned)

        def apply(y, steps, labels=None):
            if conditional:
                return apply_conditioned(model, y.to(device), labels, steps)
            return apply_f(model, y.to(device), steps)

        projector = cls(apply, sample_noise, lambda z: z, tuple(prior.shape), prior.kind, "checkpoint",
                        num_classes=model.num_classes if conditional else None)
        projector.model, projector.prior = model, prior
        # the noise f was trained on, which restore(method="latent") starts from: the run's --prior, also where
        # it samples from another (--sample-prior) or set_prior changed what generate draws from
        projector.training_prior = trained_on
        # the corruptions f was trained to undo (the restoration term), which restore(method="auto") uses
        config = meta.get("config") or {}
        taught = str(config.get("restore_corruptions", "")) if (config.get("lambda_restore") or 0) > 0 else ""
        projector.taught = tuple(k.strip() for k in taught.split(",") if k.strip())
        return projector

    def set_prior(self, prior):
        """Generate from `prior` from now on: an ign_fast.noise prior of the model's input shape. For a run trained
        without --sample-prior, e.g. ``projector.set_prior(MixturePrior.fit(training_images))`` draws its samples
        from a mixture fitted to the data, which lowered digit FID about 3x on MNIST (docs/NAIGN.md). Returns self."""
        from .noise import NoisePrior

        if self.source != "checkpoint":
            raise ValueError("set_prior needs a projector loaded from a run or checkpoint folder: an exported "
                             "file carries its prior baked in (export again with the prior you want)")
        if not isinstance(prior, NoisePrior):
            raise TypeError(f"prior must be an ign_fast.noise prior (GaussianPrior, FourierPrior, MixturePrior), "
                            f"got {type(prior).__name__}")
        if tuple(prior.shape) != self.input_shape:
            raise ValueError(f"prior must draw samples of the model's input shape {list(self.input_shape)}, got "
                             f"{list(prior.shape)}")
        self.prior, self.prior_kind = prior, prior.kind
        return self

    def noise(self, n, seed=None):
        """n prior samples z (the inputs of generation); a seed gives the same z in Python, TorchScript and
        C++ (a CPU torch.Generator)."""
        if self.prior_kind == "none":
            raise ValueError("this projector has no prior: it can project but not generate")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        return self._noise_to_input(self._sample_noise(n, seed))

    def generate(self, n, steps=1, seed=None, labels=None):
        """f^steps(z) for n prior samples z: [n, *input_shape]. labels (class-conditional runs only): the class
        of each sample, an int, a list or a tensor of n; default 0, 1, ..., K-1, 0, ..."""
        _check_positive("steps", steps)
        z = self.noise(n, seed)  # checks n first
        return self._apply(z, steps, self._labels(labels, n, required=False))

    def _images(self, images, name):
        # A grayscale image fed to a colour model is replicated over the channels (sketches, scans).
        if (isinstance(images, torch.Tensor) and len(self.input_shape) == 3 and self.input_shape[0] == 3
                and images.dim() in (3, 4) and images.shape[-3] == 1):
            images = images.expand(*images.shape[:-3], 3, *images.shape[-2:])
        return _as_batch(images, self.input_shape, name, images=True)

    def project(self, images, steps=1, labels=None):
        """f^steps(images): the nearest data-like images. images: [B, C, H, W] or [C, H, W] in [-1, 1]. labels:
        required for a class-conditional run (the class each image is projected onto)."""
        _check_positive("steps", steps)
        images = self._images(images, "images")
        return self._apply(images, steps, self._labels(labels, images.shape[0]))

    def interpolate(self, z_a, z_b, n, steps=1, labels=None):
        """f^steps of n blends from z_a to z_b (both included): slerp for a gaussian prior, linear otherwise
        (Fourier noise is not centred on a sphere). z_a, z_b: one noise sample each ([*input_shape]). labels:
        required for a class-conditional run: one class for all blends (an int) or one per blend."""
        _check_positive("n", n)
        _check_positive("steps", steps)
        z_a, z_b = _as_batch(z_a, self.input_shape, "z_a"), _as_batch(z_b, self.input_shape, "z_b")
        if z_a.shape[0] != 1 or z_b.shape[0] != 1:
            raise ValueError(f"z_a and z_b must each be one sample, got batches of {z_a.shape[0]} and "
                             f"{z_b.shape[0]}")
        t = torch.linspace(0, 1, n)
        if self.prior_kind == "gaussian":
            blends = slerp(z_a, z_b, t)[:, 0]
        else:
            t = t.view(-1, *([1] * len(self.input_shape))).to(z_a.dtype)
            blends = (1 - t) * z_a + t * z_b
        return self._apply(blends, steps, self._labels(labels, n))

    def arithmetic(self, z_a, z_b, z_c, steps=1, labels=None):
        """f^steps(z_a - z_b + z_c), batches broadcast: "a is to b as c is to ?" in noise space. labels:
        required for a class-conditional run."""
        _check_positive("steps", steps)
        z_a, z_b, z_c = (_as_batch(z, self.input_shape, name) for z, name in ((z_a, "z_a"), (z_b, "z_b"),
                                                                               (z_c, "z_c")))
        z = z_a - z_b + z_c
        return self._apply(z, steps, self._labels(labels, z.shape[0]))

    def distance(self, images, labels=None):
        """Drift of each sample under one application of f: RMS over its elements of f(y) - y, i.e.
        ||f(y) - y||_2 / sqrt(numel per sample) -> [B]. Near 0 on the learned data manifold (f(y) = y there),
        larger off it; per-element RMS so the value does not grow with the image size. labels: required for a
        class-conditional run (the drift from that class's manifold)."""
        y = self._images(images, "images")
        fy = self._apply(y, 1, self._labels(labels, y.shape[0]))
        return (fy.float() - y.to(fy.device).float()).square().flatten(1).mean(1).sqrt()

    def restore(self, y, operator, method="auto", steps=None, seed=0, **options):
        """Restore images from known measurements y = operator.A(x) (a mask, a gray or small image, noise):
        ign_fast.operators for the operators, ign_fast.restore.restore for the methods ("auto", "project",
        "consistent", "latent") and the options (starts, lr, combine, amp). y: batch first. Where the operator
        says the measurement is exact, the result keeps it: operator.A(x) == y. Returns [B, *input_shape]."""
        from .restore import restore_with_projector

        if self.num_classes is not None:
            raise ValueError("restore is not available for a class-conditional run; use project(images, "
                             "labels=...) to project images onto a class")
        return restore_with_projector(self, y, operator, method=method, steps=steps, seed=seed, **options)
