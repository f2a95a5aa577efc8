"""Export a trained f as a file that runs with torch alone: forward(x) = f^N(x), plus generation from the prior.

Formats (see docs/EXPORT.md):
  torchscript  one file (torch.jit.script): forward(x, steps=None) with N and the batch size free at run time,
               and the exported methods generate(n, seed=None, steps=None), sample_noise(n, seed=None) and
               from_noise(eps, steps=None). Loads in Python (torch.jit.load) and C++ (torch::jit::load).
  export       torch.export programs with a dynamic batch and N fixed at export time: PATH holds
               x -> f^N(x); PATH's sibling `<stem>.generate.pt2` holds eps -> f^N(prior(eps)), where eps is
               standard normal noise of shape [n, *noise_shape] (noise_shape is in the metadata).
  onnx         the same two graphs as ONNX files (`<stem>.onnx`, `<stem>.generate.onnx`).
Every file carries a JSON metadata record (IGN_FAST_METADATA) naming the input shape, N, the prior and the
normalisation that was exported.

Nothing in an exported graph is an ign_fast op: the model is rebuilt from standard torch modules, the prior's
statistics are baked in as buffers, and the Fourier prior's irfft2 is written as real matrix products so that
ONNX (which has no complex tensors) can carry it too.

Normalisation: ign_fast applies BatchNorm models with batch statistics at inference (ign_fast/inference.py),
so each BatchNorm layer is exported as train-mode normalisation that never touches running statistics.
"""
import contextlib
import copy
import json
import math
import os
import warnings
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .models import expected_input_shape
from .noise import FourierPrior, GaussianPrior, MixturePrior, mixture_from_noise

FORMATS = ("torchscript", "export", "onnx")
METADATA_NAME = "ign_fast.json"
FORMAT_TAG = "ign_fast.projector"
FORMAT_VERSION = 1


class BatchStatisticsNorm(nn.Module):
    """A BatchNorm layer applied as ign_fast's inference policy does: normalised with the current batch's
    statistics (train-mode arithmetic, momentum irrelevant), running statistics neither used nor updated."""

    def __init__(self, batch_norm: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        channels = batch_norm.num_features
        weight = batch_norm.weight if batch_norm.affine else torch.ones(channels)
        bias = batch_norm.bias if batch_norm.affine else torch.zeros(channels)
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.eps = float(batch_norm.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # training=True with no running statistics: the same kernel apply_f runs, so outputs match bit for bit.
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


def _with_batch_statistics(module: nn.Module) -> nn.Module:
    """A copy of module with every BatchNorm replaced by BatchStatisticsNorm."""
    module = copy.deepcopy(module)
    for name, child in list(module.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, BatchStatisticsNorm(child))
        else:
            setattr(module, name, _with_batch_statistics(child))
    return module


def uses_batch_statistics(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _body_of(model: nn.Module) -> nn.Module:
    """f as a plain torch module: the ign_fast model classes keep a Python dict config and a Python shape check,
    which TorchScript cannot compile, so their layers are taken without them (the exported wrapper does its own
    shape check with baked sizes); any other module is taken whole."""
    name = model.config.get("name") if isinstance(getattr(model, "config", None), dict) else None
    if name in ("dcgan28", "dcgan64"):
        body = nn.Sequential(model.encoder, model.decoder)
    elif name == "mlp":
        body = model.net
    else:
        body = model
    body = _with_batch_statistics(body)
    body.eval()  # GroupNorm and friends are stateless; eval() only fixes any dropout-like layer
    for p in body.parameters():
        p.requires_grad_(False)
    return body


def _fourier_synthesis_matrices(height: int, width: int):
    """Real matrices that compute irfft2 of an [.., H, W//2+1] spectrum (R, I) as
        Yr = Ch @ R - Sh @ I,  Yi = Sh @ R + Ch @ I        (inverse DFT along H)
        x  = Yr @ Cw - Yi @ Sw                               (half-spectrum inverse DFT along W)
    with Cw, Sw carrying irfft's 1/(H W) scale and the weight 2 of the bins whose mirror is not stored. The
    imaginary part of columns 0 and W/2 is ignored (their sine rows vanish), as a C2R transform does."""
    bins = width // 2 + 1
    h = torch.arange(height, dtype=torch.float64)
    angle_h = 2 * math.pi * torch.outer(h, h) / height  # [h, k1]
    k = torch.arange(bins, dtype=torch.float64)
    w = torch.arange(width, dtype=torch.float64)
    angle_w = 2 * math.pi * torch.outer(k, w) / width  # [k2, w]
    weight = torch.full((bins,), 2.0, dtype=torch.float64)
    weight[0] = 1.0
    if width % 2 == 0:
        weight[-1] = 1.0
    scale = (weight / (height * width)).unsqueeze(1)
    return (torch.cos(angle_h), torch.sin(angle_h), scale * torch.cos(angle_w), scale * torch.sin(angle_w))


class ExportedPrior(nn.Module):
    """The checkpoint's noise prior as a deterministic map from standard normal noise eps: gaussian is the
    identity; fourier is mean + std * eps per rfft2 bin, made Hermitian exactly as FourierPrior.sample does,
    then irfft2 by real matrix products; mixture is noise.mixture_from_noise, the map MixturePrior.sample
    itself applies, on eps [1 + rank + D]. noise_shape is eps's per-sample shape."""

    _FOURIER = ("mean_real", "std_real", "mean_imag", "std_imag", "cos_h", "sin_h", "cos_w", "sin_w", "imag_sign")
    _MIXTURE = ("boundaries", "means", "stds", "directions", "residual_stds")

    def __init__(self, prior):
        super().__init__()
        self.kind: str = prior.kind
        self.output_shape: List[int] = list(prior.shape)
        if not isinstance(prior, (GaussianPrior, FourierPrior, MixturePrior)):
            raise ValueError(f"prior must be a GaussianPrior, FourierPrior or MixturePrior, got {type(prior).__name__}")
        # TorchScript needs every attribute on every kind: the buffers a kind does not use stay empty
        for name in self._FOURIER + self._MIXTURE:
            self.register_buffer(name, torch.zeros(0))
        self.register_buffer("source_row", torch.zeros(0, dtype=torch.long))
        if isinstance(prior, GaussianPrior):
            self.noise_shape: List[int] = list(prior.shape)
            return
        if isinstance(prior, MixturePrior):
            if float(prior.weights.sum()) == 0:
                raise ValueError("prior is an unfitted MixturePrior: it has no statistics to export")
            self.noise_shape = [prior.noise_size]
            self.boundaries = prior.boundaries().detach().float().cpu().clone()
            for name in self._MIXTURE[1:]:
                setattr(self, name, getattr(prior, name).detach().float().cpu().clone())
            return
        if int(prior.num_fitted) == 0:
            raise ValueError("prior is an unfitted FourierPrior: it has no statistics to export")
        c, h, w = prior.shape
        bins = w // 2 + 1
        self.noise_shape = [2, c, h, bins]
        for name in ("mean_real", "std_real", "mean_imag", "std_imag"):
            setattr(self, name, getattr(prior, name).detach().float().cpu().clone())
        # Hermitian completion as an index map: in columns 0 and W/2 a row whose mirror row "keeps" the draw
        # reads the mirror's value (imaginary part negated); self-conjugate bins get no imaginary part.
        mirror, keep, self_conj = prior._row_mirror(torch.device("cpu"))
        source_row = torch.arange(h).unsqueeze(1).repeat(1, bins)
        imag_sign = torch.ones(h, bins)
        for j in prior._hermitian_columns():
            source_row[:, j] = torch.where(keep, torch.arange(h), mirror)
            imag_sign[:, j] = torch.where(keep, 1.0, -1.0).masked_fill(self_conj, 0.0)
        self.source_row = source_row
        self.imag_sign = imag_sign
        for name, matrix in zip(("cos_h", "sin_h", "cos_w", "sin_w"), _fourier_synthesis_matrices(h, w)):
            setattr(self, name, matrix.float())

    def forward(self, eps: torch.Tensor) -> torch.Tensor:
        if self.kind == "gaussian":
            return eps
        if self.kind == "mixture":
            z = mixture_from_noise(eps, self.boundaries, self.means, self.stds, self.directions, self.residual_stds)
            return z.reshape([eps.shape[0]] + self.output_shape)
        real = self.mean_real + self.std_real * eps[:, 0]
        imag = self.mean_imag + self.std_imag * eps[:, 1]
        index = self.source_row.expand(real.shape)
        real = torch.gather(real, 2, index)
        imag = torch.gather(imag, 2, index) * self.imag_sign
        row_real = torch.matmul(self.cos_h, real) - torch.matmul(self.sin_h, imag)
        row_imag = torch.matmul(self.sin_h, real) + torch.matmul(self.cos_h, imag)
        return torch.matmul(row_real, self.cos_w) - torch.matmul(row_imag, self.sin_w)


def _standard_normal(n: int, seed: Optional[int], noise_shape: List[int], device: torch.device) -> torch.Tensor:
    """eps [n, *noise_shape] on device; a seeded draw uses a CPU generator, so a seed gives the same numbers on
    every device (TorchScript compiles this with the exported modules that call it)."""
    if n < 0:
        raise ValueError("n must be >= 0, got " + str(n))
    size = [n] + noise_shape
    if seed is None:
        return torch.randn(size, device=device)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return torch.randn(size, generator=generator).to(device)


class ExportedProjector(nn.Module):
    """forward(x, steps=None) = f^steps(x) (default: the N given at export). generate(n, seed=None, steps=None)
    draws eps ~ N(0, I) (from torch.Generator().manual_seed(seed) when a seed is given, so Python, TorchScript
    and C++ draw the same numbers), maps it through the prior and applies f^steps."""

    def __init__(self, model: nn.Module, steps: int = 1, prior=None, input_shape=None):
        super().__init__()
        self.f = _body_of(model)
        if input_shape is None:  # ign_fast's models know their input; any other module takes the prior's shape
            try:
                input_shape = expected_input_shape(model)
            except TypeError:
                input_shape = prior.shape
        self.input_shape: List[int] = list(input_shape)
        self.default_steps: int = steps
        self.has_prior: bool = prior is not None
        self.prior_kind: str = prior.kind if prior is not None else "none"
        if prior is not None and list(prior.shape) != self.input_shape:
            raise ValueError(f"prior shape {list(prior.shape)} does not match the model's input "
                             f"{self.input_shape}")
        self.prior = ExportedPrior(prior if prior is not None else GaussianPrior(self.input_shape))
        self.noise_shape: List[int] = list(self.prior.noise_shape)

    def _check_input(self, x: torch.Tensor):
        if x.dim() != len(self.input_shape) + 1 or list(x.shape[1:]) != self.input_shape:
            raise ValueError("x must have shape [batch, " + ", ".join([str(s) for s in self.input_shape])
                             + "], got " + str(list(x.shape)))

    def forward(self, x: torch.Tensor, steps: Optional[int] = None) -> torch.Tensor:
        self._check_input(x)
        count = self.default_steps if steps is None else steps
        if count < 1:
            raise ValueError("steps must be >= 1, got " + str(count))
        for _ in range(count):
            x = self.f(x)
        return x

    @torch.jit.export
    def sample_noise(self, n: int, seed: Optional[int] = None) -> torch.Tensor:
        """Standard normal eps [n, *noise_shape] on the module's device; seeded draws use a CPU generator."""
        return _standard_normal(n, seed, self.noise_shape, self.prior.mean_real.device)

    @torch.jit.export
    def noise_to_input(self, eps: torch.Tensor) -> torch.Tensor:
        """z = prior(eps): the prior sample f starts from."""
        return self.prior(eps)

    @torch.jit.export
    def from_noise(self, eps: torch.Tensor, steps: Optional[int] = None) -> torch.Tensor:
        if not self.has_prior:
            raise ValueError("this projector was exported without a prior: it cannot generate")
        return self.forward(self.prior(eps), steps)

    @torch.jit.export
    def generate(self, n: int, seed: Optional[int] = None, steps: Optional[int] = None) -> torch.Tensor:
        if not self.has_prior:
            raise ValueError("this projector was exported without a prior: it cannot generate")
        return self.from_noise(self.sample_noise(n, seed), steps)


class ExportedConditionalProjector(nn.Module):
    """A class-conditional f (ign_fast.conditional.LabelConditioned) as a torch-only program that takes images
    and labels: forward(x, labels, steps=None) is the image part of f^steps applied to cat(x, label planes),
    the planes held fixed through the steps, as Projector does; generate(labels, seed=None, steps=None) draws
    one sample per label; from_noise(eps, labels, steps=None). x: [B, C, H, W]; labels: int64 [B] in 0..K-1
    (checked in TorchScript; torch.export and ONNX programs cannot raise on values, so there the output of an
    image whose label is outside 0..K-1 is all NaN: loud, never a plausible image of no class)."""

    def __init__(self, model: nn.Module, steps: int = 1, prior=None, input_shape=None):
        super().__init__()
        self.f = _body_of(model.base)
        self.num_classes: int = model.num_classes
        self.image_channels: int = model.image_channels
        if input_shape is None:
            if prior is not None:
                input_shape = list(prior.shape)
            else:
                input_shape = [model.image_channels] + list(expected_input_shape(model.base)[1:])
        self.input_shape: List[int] = list(input_shape)
        # what f itself takes: the image and its label planes
        self.body_input_shape: List[int] = [model.image_channels + model.num_classes] + self.input_shape[1:]
        if len(self.input_shape) != 3 or self.input_shape[0] != model.image_channels:
            raise ValueError(f"a class-conditional model exports for images [{model.image_channels}, H, W], got "
                             f"input_shape {self.input_shape}")
        if prior is not None and list(prior.shape) != self.input_shape:
            raise ValueError(f"prior shape {list(prior.shape)} does not match the model's image shape "
                             f"{self.input_shape}")
        self.default_steps: int = steps
        self.has_prior: bool = prior is not None
        self.prior_kind: str = prior.kind if prior is not None else "none"
        self.prior = ExportedPrior(prior if prior is not None else GaussianPrior(self.input_shape))
        self.noise_shape: List[int] = list(self.prior.noise_shape)
        self.check_label_values: bool = True  # False while torch.export/ONNX trace it (no value-dependent raise)

    def _planes(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or list(x.shape[1:]) != self.input_shape:
            raise ValueError("x must have shape [batch, " + ", ".join([str(s) for s in self.input_shape])
                             + "], got " + str(list(x.shape)))
        if labels.dim() != 1 or labels.shape[0] != x.shape[0]:
            raise ValueError("labels must be one class index per image ([" + str(x.shape[0]) + "]), got shape "
                             + str(list(labels.shape)))
        if self.check_label_values and labels.numel() > 0:
            if bool(labels.min() < 0) or bool(labels.max() >= self.num_classes):
                raise ValueError("labels must be class indices in 0.." + str(self.num_classes - 1))
        classes = torch.arange(self.num_classes, device=x.device)
        onehot = (labels.to(x.device).reshape(-1, 1) == classes.reshape(1, -1)).to(x.dtype)
        return onehot.reshape(x.shape[0], self.num_classes, 1, 1).expand(x.shape[0], self.num_classes,
                                                                        x.shape[2], x.shape[3])

    def forward(self, x: torch.Tensor, labels: torch.Tensor, steps: Optional[int] = None) -> torch.Tensor:
        planes = self._planes(x, labels)
        count = self.default_steps if steps is None else steps
        if count < 1:
            raise ValueError("steps must be >= 1, got " + str(count))
        for _ in range(count):
            x = self.f(torch.cat([x, planes], 1))[:, :self.image_channels]
        # a label outside 0..K-1 matched no class (all-zero planes): NaN marks its output, after f, so a
        # BatchNorm model's batch statistics and the other images stay as they are
        unknown = planes[:, :, 0, 0].sum(1) == 0
        return torch.where(unknown.reshape(-1, 1, 1, 1), torch.full_like(x, float("nan")), x)

    @torch.jit.export
    def sample_noise(self, n: int, seed: Optional[int] = None) -> torch.Tensor:
        """Standard normal eps [n, *noise_shape]; seeded draws use a CPU generator (as ExportedProjector)."""
        return _standard_normal(n, seed, self.noise_shape, self.prior.mean_real.device)

    @torch.jit.export
    def noise_to_input(self, eps: torch.Tensor) -> torch.Tensor:
        return self.prior(eps)

    @torch.jit.export
    def from_noise(self, eps: torch.Tensor, labels: torch.Tensor, steps: Optional[int] = None) -> torch.Tensor:
        if not self.has_prior:
            raise ValueError("this projector was exported without a prior: it cannot generate")
        return self.forward(self.prior(eps), labels, steps)

    @torch.jit.export
    def generate(self, labels: torch.Tensor, seed: Optional[int] = None, steps: Optional[int] = None) -> torch.Tensor:
        """One sample of each requested class: [len(labels), *input_shape]."""
        if not self.has_prior:
            raise ValueError("this projector was exported without a prior: it cannot generate")
        return self.from_noise(self.sample_noise(labels.shape[0], seed), labels, steps)


class _FromNoiseConditional(nn.Module):
    """(eps, labels) -> f^N(prior(eps)) for a class-conditional export."""

    def __init__(self, projector: ExportedConditionalProjector):
        super().__init__()
        self.projector = projector
        self.eval()

    def forward(self, eps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.projector.from_noise(eps, labels)


class _FromNoise(nn.Module):
    """eps -> f^N(prior(eps)): the generation graph for formats that hold one program per file."""

    def __init__(self, projector: ExportedProjector):
        super().__init__()
        self.projector = projector
        self.eval()

    def forward(self, eps: torch.Tensor) -> torch.Tensor:
        return self.projector.from_noise(eps)


def generate_path(path):
    """Where the generation program of a torch.export or ONNX export lives: `<stem>.generate<ext>`."""
    stem, ext = os.path.splitext(path)
    return f"{stem}.generate{ext}"


def _check_steps(steps):
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    return steps


def _metadata(projector, fmt, steps, model):
    from .model_record import record_for

    metadata = {
        "format": FORMAT_TAG, "version": FORMAT_VERSION, "export_format": fmt, "steps": steps,
        "input_shape": projector.input_shape, "noise_shape": projector.noise_shape,
        "prior": projector.prior_kind, "model_config": record_for(model),
        "normalization": "batch-statistics" if uses_batch_statistics(model) else "eval",
    }
    if isinstance(projector, ExportedConditionalProjector):  # its programs take (x or eps, labels)
        metadata.update(num_classes=projector.num_classes, inputs=["x", "labels"],
                        generate_inputs=["eps", "labels"])
    return metadata


def _example_batch(shape, batch=2):
    # Batch 2, not 1: torch.export specialises sizes 0 and 1, which would pin the batch dimension.
    return torch.randn(batch, *shape)


def _example_labels(projector, batch=2):
    return torch.arange(batch, dtype=torch.int64) % projector.num_classes


def _export_programs(projector, steps):
    from torch.export import Dim

    batch = Dim("batch", min=1, max=1 << 20)
    if isinstance(projector, ExportedConditionalProjector):
        labels = _example_labels(projector)
        forward_program = torch.export.export(projector, (_example_batch(projector.input_shape), labels),
                                              dynamic_shapes={"x": {0: batch}, "labels": {0: batch}}, strict=False)
        generate_program = None
        if projector.has_prior:
            generate_program = torch.export.export(_FromNoiseConditional(projector),
                                                   (_example_batch(projector.noise_shape), labels),
                                                   dynamic_shapes={"eps": {0: batch}, "labels": {0: batch}},
                                                   strict=False)
        return forward_program, generate_program
    forward_program = torch.export.export(projector, (_example_batch(projector.input_shape),),
                                          dynamic_shapes={"x": {0: batch}}, strict=False)
    generate_program = None
    if projector.has_prior:
        generate_program = torch.export.export(_FromNoise(projector), (_example_batch(projector.noise_shape),),
                                               dynamic_shapes={"eps": {0: batch}}, strict=False)
    return forward_program, generate_program


def _export_onnx(module, example, input_name, path):
    """example, input_name: one tensor and its name, or tuples of them (a conditional program's x, labels)."""
    try:
        import onnx  # noqa: F401  (torch.onnx needs onnx and onnxscript to write the file)
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ImportError(f"format 'onnx' needs the onnx and onnxscript packages ({error}); "
                          "pip install onnx onnxscript onnxruntime") from None
    from torch.export import Dim

    examples = tuple(example) if isinstance(example, (tuple, list)) else (example,)
    names = list(input_name) if isinstance(input_name, (tuple, list)) else [input_name]
    batch = Dim("batch", min=1)
    with _quiet_onnx_exporter():
        program = torch.onnx.export(module, examples, dynamic_shapes={name: {0: batch} for name in names},
                                    input_names=names, output_names=["y"], dynamo=True, verbose=False)
    program.save(path)


def _not_about_torchvision(record):
    return not str(record.msg).startswith("torchvision is not installed")


@contextlib.contextmanager
def _quiet_onnx_exporter():
    """torch.onnx's exporter logs "torchvision is not installed" once per torchvision op on every export, and
    torch's own pytree code raises a FutureWarning about LeafSpec: ten lines a user of ign_fast can do nothing
    about (no torchvision op is ever exported here). Only those are dropped; anything else still shows."""
    import logging

    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    registration.addFilter(_not_about_torchvision)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*LeafSpec.* is deprecated", category=FutureWarning)
            # a conditional program's x and labels share one batch dimension by design; torch.onnx says so
            warnings.filterwarnings("ignore", message=r"# The axis name: .* will not be used", category=UserWarning)
            yield
    finally:
        registration.removeFilter(_not_about_torchvision)


def _attach_onnx_metadata(path, metadata):
    import onnx

    proto = onnx.load(path)
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_NAME, json.dumps(metadata)
    onnx.save(proto, path)


@contextlib.contextmanager
def _quiet_torchscript_deprecation():
    """Recent torch marks torch.jit.script/save/load deprecated; TorchScript remains the one format libtorch C++
    loads and the only one whose loop count and batch stay free at run time, so the warning tells our user
    nothing they can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.(script|save|load).* is deprecated",
                                category=DeprecationWarning)
        yield


def _scriptable_body(projector):
    """TorchScript needs f compiled: scripted where the module's code allows it, else traced (the module's
    Python runs once with an example batch) with a check that the traced program still takes another batch
    size and gives the eager module's values."""
    body = projector.f
    body_shape = getattr(projector, "body_input_shape", projector.input_shape)  # a conditional f's C+K channels
    try:
        with _quiet_torchscript_deprecation():
            return torch.jit.script(body)
    except Exception as script_error:
        example = _example_batch(body_shape, 2)
        try:
            with _quiet_torchscript_deprecation(), warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                traced = torch.jit.trace(body, (example,), check_trace=False)
            other = _example_batch(body_shape, 3)
            with torch.no_grad():
                same = torch.allclose(traced(other), body(other), rtol=1e-4, atol=1e-5)
        except Exception as trace_error:
            raise ValueError(f"model cannot be exported to TorchScript: scripting failed "
                             f"({_first_line(script_error)}) and so did tracing ({_first_line(trace_error)})") from None
        if not same:
            raise ValueError(f"model cannot be exported to TorchScript: scripting failed ({_first_line(script_error)}) "
                             f"and the traced program does not keep the batch size free (it differs from the model "
                             f"at batch 3); try format 'export' or 'onnx'")
        return traced


def export_projector(model, path, steps=1, format="torchscript", prior=None, input_shape=None):
    """Write f^steps (and generation from prior, when given) to path in format; returns the written paths,
    path first. model is any nn.Module mapping [B, *input_shape] to the same shape (ign_fast's models, or
    your own: TorchScript scripts it, or traces it when it cannot be scripted; torch.export and ONNX trace
    it with a free batch size); prior a GaussianPrior or FourierPrior. input_shape: the per-sample shape f
    takes, needed only when there is no prior and the model is not one of ign_fast's."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {format!r}")
    steps = _check_steps(steps)
    # torch.export's archive reader and ONNX tools go by the extension, and the generation file's name is
    # derived from it: refuse a path that would make a file those tools mistake for something else.
    required_suffix = {"export": ".pt2", "onnx": ".onnx"}.get(format)
    if required_suffix is not None and not os.fspath(path).endswith(required_suffix):
        raise ValueError(f"path must end in {required_suffix} for format {format!r}, got {os.fspath(path)!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    from .conditional import LabelConditioned

    conditional = isinstance(model, LabelConditioned)
    if prior is None and input_shape is None:
        try:
            expected_input_shape(model.base if conditional else model)
        except TypeError:
            raise ValueError("input_shape must be given (the per-sample shape f takes) to export a model that is "
                             "not one of ign_fast's without a prior") from None
    model = copy.deepcopy(model).cpu().float()
    if prior is not None:
        prior = copy.deepcopy(prior).cpu()
    exported_class = ExportedConditionalProjector if conditional else ExportedProjector
    projector = exported_class(model, steps, prior, input_shape).cpu().eval()
    metadata = _metadata(projector, format, steps, model)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if format == "torchscript":
        projector.f = _scriptable_body(projector)
        with _quiet_torchscript_deprecation():
            scripted = torch.jit.script(projector)
            torch.jit.save(scripted, path, _extra_files={METADATA_NAME: json.dumps(metadata)})
        return [path]
    if conditional:  # torch.export and ONNX trace it: a value-dependent raise cannot be in their graphs
        projector.check_label_values = False
    if format == "export":
        try:
            forward_program, generate_program = _export_programs(projector, steps)
        except Exception as error:  # torch.export names the op or line it could not trace
            raise ValueError(f"model cannot be exported with torch.export: {_first_line(error)}") from None
        torch.export.save(forward_program, path, extra_files={METADATA_NAME: json.dumps(metadata)})
        written = [path]
        if generate_program is not None:
            torch.export.save(generate_program, generate_path(path),
                              extra_files={METADATA_NAME: json.dumps(dict(metadata, program="generate"))})
            written.append(generate_path(path))
        return written
    if conditional:
        labels = _example_labels(projector)
        _export_onnx(projector, (_example_batch(projector.input_shape), labels), ("x", "labels"), path)
    else:
        _export_onnx(projector, _example_batch(projector.input_shape), "x", path)
    _attach_onnx_metadata(path, metadata)
    written = [path]
    if projector.has_prior and conditional:
        _export_onnx(_FromNoiseConditional(projector), (_example_batch(projector.noise_shape), labels),
                     ("eps", "labels"), generate_path(path))
        _attach_onnx_metadata(generate_path(path), dict(metadata, program="generate"))
        written.append(generate_path(path))
    elif projector.has_prior:
        _export_onnx(_FromNoise(projector), _example_batch(projector.noise_shape), "eps", generate_path(path))
        _attach_onnx_metadata(generate_path(path), dict(metadata, program="generate"))
        written.append(generate_path(path))
    return written


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_torchscript(path, map_location="cpu"):
    """(scripted projector, metadata) from a TorchScript export; ValueError (one line) when the file is missing,
    truncated, corrupt, or not an ign_fast projector."""
    if not os.path.isfile(path):
        raise ValueError(f"export file {path!r} does not exist")
    extra = {METADATA_NAME: ""}
    try:
        with _quiet_torchscript_deprecation():
            module = torch.jit.load(path, map_location=map_location, _extra_files=extra)
    except Exception as error:  # torch raises RuntimeError for bad zips, ValueError/OSError for other damage
        raise ValueError(f"export file {path!r} is corrupt or not a TorchScript file ({_first_line(error)})") \
            from None
    try:
        metadata = json.loads(extra[METADATA_NAME])
    except ValueError:
        metadata = None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_TAG:
        raise ValueError(f"export file {path!r} is TorchScript but not an ign_fast projector (no {METADATA_NAME})")
    if metadata.get("version") != FORMAT_VERSION:
        raise ValueError(f"export file {path!r} has projector format version {metadata.get('version')!r}; "
                         f"this ign_fast reads version {FORMAT_VERSION}")
    return module, metadata
