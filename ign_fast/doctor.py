"""ign-fast doctor: the build facts, then every op and every training-step mode checked against the PyTorch
reference on this machine. The first command to run on a new machine, and the first the GPU check runs; like
`python -m torch.utils.collect_env`, but it also checks correctness.

    ign-fast doctor [--device auto|cpu|cuda] [--backend all|native,triton,torch] [--checks all|ops|steps]
                    [--json PATH]
    python -m ign_fast.doctor ...

Exit status 0 when every check passes; 1 on any failure (a mismatch, a check that raised, the extension missing
without IGN_FAST_DISABLE_EXTENSION=1, a GPU visible but no CUDA kernels built); 2 on bad usage.

What is checked
- build: the extension loaded; with a GPU visible, its CUDA kernels were built.
- ops: per_sample_distance, ign_loss and nearest_neighbors on every device present (cpu;
  cuda when a GPU is visible) and every backend present there: native (the C++/CUDA kernels), triton (on a GPU;
  on the CPU only in triton's slow interpreter, when TRITON_INTERPRET=1 was set before triton was imported, or
  with --triton-interpret) and torch (the reference path through ign_fast.ops). Each in float32, bfloat16 and
  float64 on two odd shapes: rows of 105 elements (a kernel that drops a tail element is off by 1%) and of
  4551 (several steps of a block's loop a row: past Triton's 1024-element block and the 256 CUDA threads); the
  interpreter takes the small one only (about 25 s instead of 7 minutes here). Outputs, and gradients through
  autograd with random weights on every output (so each output's backward path is used), are compared with
  ign_fast.reference evaluated in float64 on the same inputs.
- steps: IGNStep (a GroupNorm DCGAN28, whose fused step makes one batched call, and a BatchNorm one, whose
  fused step calls separately) in modes fused and graph (CUDA only: on the CPU graph is fused) against
  mode="reference"; NAIGNStep (refresh_every=2, so a refresh and a reuse of candidates are both taken) in mode
  fused against a plain eager NAIGN update written here from the paper's formula, and graph against fused.
  From identical copies, the same batches, Adam; the parameters, floating buffers and per-update losses are
  compared after 3 updates on the CPU, and on CUDA after enough more that the graph is captured and replayed
  (graph mode runs its first updates of each input shape eagerly).

Error: max|out - ref| / max|ref| over a whole tensor (relative, in the max norm: an entry near zero, such as a
gradient that cancels, is judged on its tensor's scale); a check's error is its worst tensor's, named in
`detail`. NaN or inf where the reference is finite is an infinite error.

Tolerances (relative, max norm), and why:
- float64 ops 1e-10: float64 accumulation over at most 4551 terms errs about 1e-13.
- float32 ops 2e-5: float32 accumulation errs about 1e-6 here (the unit tests allow 1e-5).
- bfloat16 ops: values 2e-5 (bfloat16 inputs are exact in float32, where the kernels accumulate); gradients
  8e-3 (they come back in bfloat16, whose unit roundoff is 2^-8 = 3.9e-3: the CPU kernels, like the reference
  path, land at 3.3e-3, and the Triton kernels in triton's CPU interpreter at up to 6.5e-3, a second rounding
  somewhere; twice the roundoff allows that, while any error in a formula is far larger).
- nearest_neighbors index: no row may choose a candidate whose float64 distance exceeds the nearest one's by
  more than the dtype's value tolerance (near-ties may go either way); its distance is checked against the
  float64 distance of the candidate it chose.
- steps: float64 1e-9; float32 1e-4 (three Adam updates amplify float32 rounding in gradients: Adam divides
  by sqrt of the second moment, so a relative gradient error of 1e-6 can become about 1e-5 in an update).
  Graph mode in float64 1e-7: it makes Adam capturable, and capturable Adam computes its bias corrections from
  a float32 step counter.
  On CUDA TF32 is turned off during the checks (and restored): the fused step batches its calls differently
  from the reference, so TF32's 1e-3 rounding would otherwise differ between them.
"""
import argparse
import contextlib
import copy
import json
import math
import os
import sys
import time

import torch

EXIT_OK, EXIT_MISMATCH, EXIT_USAGE = 0, 1, 2
DTYPES = (torch.float32, torch.bfloat16, torch.float64)
BACKENDS = ("native", "triton", "torch")
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float64: "float64"}

# (values, gradients) relative tolerances per input dtype: see the module docstring
OP_TOLERANCE = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-5, 8e-3)}
STEP_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}
# graph mode makes Adam capturable, whose step counter is a float32 tensor: its bias corrections carry float32
# rounding (6e-8 relative) into every float64 update, about 1e-10 of the parameters' scale per update
GRAPH_STEP_TOLERANCE = {torch.float64: 1e-7, torch.float32: 1e-4}
# per-sample shapes: 105 elements (odd, small: a dropped tail element is a 1% error), 4551 (> 1024: several
# steps of a block's loop a row)
OP_SHAPES = ((3, 5, 7), (3, 37, 41))
STEP_UPDATES = 3


class DoctorUsageError(ValueError):
    """Bad usage of the doctor (exit 2); a ValueError so that ign_fast.cli reports it like its own."""


class Result:
    """One line of the table."""

    def __init__(self, check, device="-", dtype="-", backend="-", error=None, tolerance=None, status="PASS",
                 detail="", seconds=0.0):
        self.check, self.device, self.dtype, self.backend = check, device, dtype, backend
        self.error, self.tolerance, self.status, self.detail, self.seconds = error, tolerance, status, detail, seconds

    def as_dict(self):
        return {"check": self.check, "device": self.device, "dtype": self.dtype, "backend": self.backend,
                "error": None if self.error is None or not math.isfinite(self.error) else self.error,
                "error_text": _fmt(self.error), "tolerance": self.tolerance, "status": self.status,
                "detail": self.detail, "seconds": round(self.seconds, 4)}


def _fmt(value):
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return "inf" if math.isinf(value) else ("nan" if math.isnan(value) else f"{value:.2e}")


# ---------------------------------------------------------------------------------------------------------
# comparisons

def relative_error(out, ref):
    """max|out - ref| / max|ref| in float64 (absolute where ref is all zero); inf for NaN/inf out of a finite
    ref, or a shape mismatch."""
    if out is None or ref is None:
        return math.inf if (out is None) != (ref is None) else 0.0
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if out.shape != ref.shape:
        return math.inf
    if out.numel() == 0:
        return 0.0
    if not bool(torch.isfinite(out).all()):
        return math.inf
    scale = float(ref.abs().max())
    return float((out - ref).abs().max()) / (scale if scale > 0 else 1.0)


def worst(named_errors):
    """(largest error, its name) of [(name, error), ...]."""
    name, error = max(named_errors, key=lambda item: item[1])
    return error, name


def verdict(error, tolerance):
    return "PASS" if error <= tolerance else "FAIL"  # NaN compares False: never passes


# ---------------------------------------------------------------------------------------------------------
# which devices and backends are present

def devices_present():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backend_reason(backend, device):
    """None when backend can run on device, else why not (a SKIP line's detail)."""
    from . import _extension

    if backend == "native":
        if not _extension.HAS_C:
            return f"extension not loaded ({_extension.LOAD_ERROR})"
        if device == "cuda" and not _extension.CUDA_BUILT:
            return "extension built without CUDA kernels"
        return None
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed"
        if device == "cpu" and os.environ.get("TRITON_INTERPRET", "") != "1":
            return "on the CPU triton runs only in its interpreter: --triton-interpret (slow)"
        return None
    return None


@contextlib.contextmanager
def using_backend(name):
    from . import ops

    before = ops.get_backend()
    ops.set_backend(name)
    try:
        yield
    finally:
        ops.set_backend(before)


def path_taken(op, t):
    """The implementation ign_fast.ops runs for op on tensors like t under the current backend."""
    from . import ops

    if op != "nearest_neighbors":
        return ops.kernel_path(t)
    if ops.get_backend() == "triton":
        return "triton"
    if ops.native_available(t) and not (t.is_cuda and t.dtype == torch.float64):
        return "native"
    return "torch"


def expected_path(op, backend, t):
    """(path the dispatch should take, a note when it is not the backend asked for by design)."""
    if op == "nearest_neighbors" and backend == "native" and t.is_cuda and t.dtype == torch.float64:
        return "torch", "no float64 CUDA kernel: the reference runs"
    return backend, ""


# ---------------------------------------------------------------------------------------------------------
# op checks: each returns [(name, error)] for values and for gradients, compared with reference in float64

def _random(shape, dtype, device, generator, low=-1.0, high=1.0):
    t = torch.rand(shape, generator=generator, dtype=torch.float64) * (high - low) + low
    return t.to(device=device, dtype=dtype)


def _leaves(tensors):
    """float64 copies of the inputs (the reference's inputs: the same values) and the inputs as leaves."""
    ins = [t.detach().clone().requires_grad_() for t in tensors]
    refs = [t.detach().double().requires_grad_() for t in tensors]
    return ins, refs


def _weighted(outputs, weights):
    """sum_k <w_k, out_k>: outputs come in float32 or float64 (the accumulation dtype), weights in float64."""
    return sum((o * w.to(o.device, o.dtype)).sum() for o, w in zip(outputs, weights))


def check_per_sample_distance(device, dtype, gen, shapes, kind):
    from . import ops, reference

    values, grads = [], []
    for shape in shapes:
        batch = 5
        a, b = (_random((batch, *shape), dtype, device, gen) for _ in range(2))
        w = torch.randn(batch, generator=gen, dtype=torch.float64)
        (ai, bi), (ar, br) = _leaves([a, b])
        out = ops.per_sample_distance(ai, bi, kind)
        ref = reference.per_sample_distance(ar, br, kind)
        _weighted([out], [w]).backward()
        _weighted([ref], [w]).backward()
        tag = "x".join(map(str, shape))
        values.append((f"d {tag}", relative_error(out, ref)))
        grads += [(f"grad_a {tag}", relative_error(ai.grad, ar.grad)), (f"grad_b {tag}", relative_error(bi.grad,
                                                                                                        br.grad))]
    return values, grads


def _ign_inputs(device, dtype, gen, shape, batch_x, batch_z, aliased):
    x, fx = (_random((batch_x, *shape), dtype, device, gen) for _ in range(2))
    fz, f_fz = (_random((batch_z, *shape), dtype, device, gen) for _ in range(2))
    ff_z = f_fz if aliased else _random((batch_z, *shape), dtype, device, gen)
    return [x, fx, fz, f_fz, ff_z]


IGN_NAMES = ("x", "fx", "fz", "f_fz", "ff_z")
IGN_OUTPUTS = ("total", "rec", "idem", "tight")


def check_ign_loss(device, dtype, gen, shapes, kind, ratio, aliased=False):
    """ign_loss through autograd: all four outputs, and the gradients of a random weighting of all four.
    aliased: f_fz and ff_z one storage, as the fused step passes them (t and t.detach(); the kernels read it
    once), each role still a leaf of its own that gets its own gradient; the reference gets separate copies."""
    from . import ops, reference

    values, grads = [], []
    for shape in shapes:
        batch_x = 5
        batch_z = batch_x if ratio is not None else batch_x + 2  # the clamp needs Bz == Bx
        inputs = _ign_inputs(device, dtype, gen, shape, batch_x, batch_z, aliased=aliased)
        ins, refs = _leaves(inputs)
        if aliased:
            ins[4] = ins[3].detach().requires_grad_()  # same storage, offset and strides as ins[3]
        config = (kind, 20.0, 20.0, 2.5, ratio)
        out = ops.ign_loss(*ins, *config)
        ref = reference.ign_loss(*refs, *config)
        weights = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in ref]
        _weighted(out, weights).backward()
        _weighted(ref, weights).backward()
        tag = "x".join(map(str, shape))
        values += [(f"{n} {tag}", relative_error(o, r)) for n, o, r in zip(IGN_OUTPUTS, out, ref)]
        grads += [(f"grad_{n} {tag}", relative_error(i.grad, r.grad)) for n, i, r in zip(IGN_NAMES, ins, refs)]
    return values, grads


def _distances64(q, c, metric, chunk=64):
    """[B, M] float64 distances, candidates in chunks so memory stays small."""
    q = q.reshape(q.shape[0], -1).double()
    c = c.reshape(c.shape[0], -1).double()
    parts = []
    for start in range(0, c.shape[0], chunk):
        diff = q[:, None, :] - c[None, start:start + chunk, :]
        parts.append((diff.abs() if metric == "l1" else diff.square()).mean(dim=2))
    return torch.cat(parts, dim=1)


NN_SHAPES = ((37, 131, (3, 5, 7)), (5, 1031, (3, 37, 41)))  # (queries, candidates, per-row shape)


def check_nearest_neighbors(device, dtype, gen, shapes, metric):
    """(index check: rows choosing a not-(near-)nearest candidate, distance errors)."""
    from . import ops

    tie = OP_TOLERANCE[dtype][0]
    bad_rows, values = 0, []
    for batch, count, shape in shapes:
        q = _random((batch, *shape), dtype, device, gen)
        c = _random((count, *shape), dtype, device, gen)
        index, distance = ops.nearest_neighbors(q, c, metric)
        d64 = _distances64(q.cpu(), c.cpu(), metric)
        best = d64.min(dim=1).values
        index = index.cpu()
        if index.dtype != torch.int64 or index.shape != (batch,) or bool(((index < 0) | (index >= count)).any()):
            return math.inf, [(f"index {tuple(index.shape)} {index.dtype} out of range", math.inf)]
        chosen = d64.gather(1, index[:, None])[:, 0]
        bad_rows += int((chosen > best * (1 + tie) + 1e-300).sum())
        values.append((f"distance {batch}x{count}x{math.prod(shape)}", relative_error(distance, chosen)))
    return bad_rows, values


# ---------------------------------------------------------------------------------------------------------
# step checks

def _flat(tensors):
    tensors = list(tensors)
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([t.detach().double().reshape(-1).cpu() for t in tensors])


def state_errors(model, ref_model, losses, ref_losses):
    errors = [("parameters", relative_error(_flat(model.parameters()), _flat(ref_model.parameters())))]
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    if buffers:
        ref_buffers = [b for b in ref_model.buffers() if b.is_floating_point()]
        errors.append(("buffers", relative_error(_flat(buffers), _flat(ref_buffers))))
    errors.append(("losses", relative_error(torch.tensor(losses, dtype=torch.float64),
                                            torch.tensor(ref_losses, dtype=torch.float64))))
    return errors


def _graph_warmup():
    try:
        from .graph_step import WARMUP_STEPS
    except ImportError:  # the constant may move; 3 is what graph mode has used
        return 3
    return int(WARMUP_STEPS)


def _dcgan(norm):
    from .models import DCGAN28

    return DCGAN28(latent_dim=8, width=8, norm=norm)


def run_ign(model, mode, batches, dtype):
    import ign_fast
    from .objectives import IGNLoss

    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.5, 0.999))
    step = ign_fast.IGNStep(model, opt, loss=IGNLoss(), mode=mode)  # looked up at call time: tests swap it
    return [step(x, z)["loss"] for x, z in batches]


def check_ign_steps(device, dtype, norm, modes, seed):
    """{mode: [(name, error)]} for each mode against mode="reference" after the same updates."""
    updates = STEP_UPDATES + (_graph_warmup() if "graph" in modes else 0)
    gen = torch.Generator().manual_seed(seed)
    batches = [(_random((3, 1, 28, 28), dtype, device, gen), torch.randn((3, 1, 28, 28), generator=gen,
                                                                          dtype=torch.float64).to(device, dtype))
               for _ in range(updates)]
    torch.manual_seed(seed)
    base = _dcgan(norm).to(device=device, dtype=dtype)
    ref_model = copy.deepcopy(base)
    ref_losses = run_ign(ref_model, "reference", batches, dtype)
    out = {}
    for mode in modes:
        model = copy.deepcopy(base)
        out[mode] = (state_errors(model, ref_model, run_ign(model, mode, batches, dtype), ref_losses), updates)
    return out


NAIGN_CONFIG = {"distance": "l1", "lambda_rec": 1.0, "lambda_imle": 1.0, "lambda_idem": 0.5,
                "candidates_per_sample": 4, "refresh_every": 2}


def _noise_source(seed, device, dtype):
    gen = torch.Generator().manual_seed(seed + 1)
    return lambda n: torch.randn((n, 1, 28, 28), generator=gen, dtype=torch.float64).to(device, dtype)


def naign_plain_updates(model, xs, sample_noise):
    """NAIGN written out eagerly from its formula (ign_fast/naign.py's docstring), the oracle for the fused
    step: a pool of k·B noise drawn every R calls and its candidates f_θ(pool) generated then without autograd;
    for each x_i the nearest candidate j*(i) (float64 search); loss = λr·mean d(f(x), x) + λ·mean d(f(z*), x)
    + λidem·mean d(f_θ'(f(z*)), f(z*)) with θ' the detached parameters; Adam."""
    from torch.func import functional_call

    from . import reference

    c = NAIGN_CONFIG
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.5, 0.999))
    losses, pool, candidates = [], None, None
    for call, x in enumerate(xs):
        if call % c["refresh_every"] == 0:
            pool = sample_noise(c["candidates_per_sample"] * x.shape[0])
            with torch.no_grad():
                candidates = model(pool)  # GroupNorm: no buffers, no batch coupling
        index = _distances64(x, candidates, c["distance"]).argmin(dim=1).to(x.device)
        fx, f_znn = model(x), model(pool.index_select(0, index))
        frozen = {name: p.detach() for name, p in model.named_parameters()}
        f_f_znn = functional_call(model, frozen, (f_znn,))
        d = c["distance"]
        total = (c["lambda_rec"] * reference.per_sample_distance(fx, x, d).mean()
                 + c["lambda_imle"] * reference.per_sample_distance(f_znn, x, d).mean()
                 + c["lambda_idem"] * reference.per_sample_distance(f_f_znn, f_znn, d).mean())
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        losses.append(total.item())
    return losses


def run_naign(model, mode, xs, sample_noise):
    import ign_fast

    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.5, 0.999))
    step = ign_fast.NAIGNStep(model, opt, loss=ign_fast.NAIGNLoss(**NAIGN_CONFIG), mode=mode,
                              sample_noise=sample_noise)
    return [step(x)["loss"] for x in xs]


def check_naign_steps(device, dtype, modes, seed):
    """{mode: [(name, error)]}: fused against the plain update above, graph against fused."""
    # graph mode captures a refresh call and a reuse call separately: each needs its warm-up before capture
    updates = STEP_UPDATES + (2 * _graph_warmup() + 1 if "graph" in modes else 0)
    gen = torch.Generator().manual_seed(seed)
    xs = [_random((3, 1, 28, 28), dtype, device, gen) for _ in range(updates)]
    torch.manual_seed(seed)
    base = _dcgan("group").to(device=device, dtype=dtype)
    plain = copy.deepcopy(base)
    plain_losses = naign_plain_updates(plain, xs, _noise_source(seed, device, dtype))
    fused = copy.deepcopy(base)
    fused_losses = run_naign(fused, "fused", xs, _noise_source(seed, device, dtype))
    out = {"fused": (state_errors(fused, plain, fused_losses, plain_losses), updates, "plain NAIGN update")}
    if "graph" in modes:
        graph = copy.deepcopy(base)
        graph_losses = run_naign(graph, "graph", xs, _noise_source(seed, device, dtype))
        out["graph"] = (state_errors(graph, fused, graph_losses, fused_losses), updates, "mode fused")
    return out


# ---------------------------------------------------------------------------------------------------------
# running the checks

def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _failure(error):
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"raised {type(error).__name__}: {message}"[:160]


def build_checks(results):
    """Build facts as checks: the extension loaded; with a GPU visible, CUDA kernels built."""
    from . import _extension

    disabled = _extension.LOAD_ERROR == "disabled by IGN_FAST_DISABLE_EXTENSION"
    if _extension.HAS_C:
        results.append(Result("extension loaded", detail=f"built against torch {_extension._C.torch_version}"))
    elif disabled:
        results.append(Result("extension loaded", status="SKIP", detail="IGN_FAST_DISABLE_EXTENSION=1"))
    else:
        results.append(Result("extension loaded", status="FAIL", detail=str(_extension.LOAD_ERROR)[:160]))
    if torch.cuda.is_available():
        if _extension.CUDA_BUILT:
            results.append(Result("CUDA kernels built", device="cuda",
                                  detail=f"built with CUDA {_extension._C.cuda_version}"))
        elif disabled:
            results.append(Result("CUDA kernels built", device="cuda", status="SKIP",
                                  detail="IGN_FAST_DISABLE_EXTENSION=1"))
        else:
            results.append(Result("CUDA kernels built", device="cuda", status="FAIL",
                                  detail="a GPU is visible but the extension has no CUDA kernels: rebuild with "
                                         "IGN_FAST_CUDA=1"))


OP_CASES = (
    ("per_sample_distance l1", "per_sample_distance", lambda *a: check_per_sample_distance(*a, "l1")),
    ("per_sample_distance l2", "per_sample_distance", lambda *a: check_per_sample_distance(*a, "l2")),
    ("ign_loss l1 clamp", "ign_loss", lambda *a: check_ign_loss(*a, "l1", 1.5)),
    ("ign_loss l2 noclamp Bz>Bx", "ign_loss", lambda *a: check_ign_loss(*a, "l2", None)),
    ("ign_loss l1 clamp aliased", "ign_loss", lambda *a: check_ign_loss(*a, "l1", 1.5, aliased=True)),
)


def op_checks(results, device, backend, seed):
    reason = backend_reason(backend, device)
    if reason is not None:
        results.append(Result("ops", device, "-", backend, status="SKIP", detail=reason))
        return
    # triton's CPU interpreter runs the wide shapes for minutes; their code paths (more than 1024 elements a
    # row, many candidate tiles) are the GPU's concern, where the full shapes run
    interpreted = backend == "triton" and device == "cpu"
    shapes, nn_shapes = (OP_SHAPES[:1], NN_SHAPES[:1]) if interpreted else (OP_SHAPES, NN_SHAPES)
    for dtype in DTYPES:
        value_tol, grad_tol = OP_TOLERANCE[dtype]
        name = DTYPE_NAMES[dtype]
        probe = torch.empty(0, device=device, dtype=dtype)
        with using_backend(backend):
            for label, op, case in OP_CASES:
                gen = torch.Generator().manual_seed(seed)
                start = time.perf_counter()
                expected, note = expected_path(op, backend, probe)
                taken = path_taken(op, probe)
                try:
                    values, grads = case(device, dtype, gen, shapes)
                    _sync(device)
                except Exception as error:  # a check that raises is a failure, and the rest still run
                    results.append(Result(label, device, name, backend, math.inf, value_tol, "FAIL",
                                          _failure(error), time.perf_counter() - start))
                    continue
                seconds = time.perf_counter() - start
                # values and gradients have their own tolerances: report whichever is furthest over its own
                v_err, v_name = worst(values)
                g_err, g_name = worst(grads)
                if g_err / grad_tol > v_err / value_tol:
                    error, tol, detail = g_err, grad_tol, g_name
                else:
                    error, tol, detail = v_err, value_tol, v_name
                status = verdict(error, tol)
                if taken != expected:
                    status, detail = "FAIL", f"dispatch ran {taken}, not {expected}"
                results.append(Result(label, device, name, backend, error, tol, status,
                                      f"worst: {detail}" + (f"; {note}" if note else ""), seconds))
            for metric in ("l1", "l2"):
                gen = torch.Generator().manual_seed(seed)
                start = time.perf_counter()
                expected, note = expected_path("nearest_neighbors", backend, probe)
                taken = path_taken("nearest_neighbors", probe)
                try:
                    bad_rows, values = check_nearest_neighbors(device, dtype, gen, nn_shapes, metric)
                    _sync(device)
                except Exception as error:
                    results.append(Result(f"nearest_neighbors {metric}", device, name, backend, math.inf,
                                          value_tol, "FAIL", _failure(error), time.perf_counter() - start))
                    continue
                seconds = time.perf_counter() - start
                dispatch_note = f"dispatch ran {taken}, not {expected}" if taken != expected else note
                status = "FAIL" if taken != expected else verdict(bad_rows, 0)
                results.append(Result(f"nearest_neighbors {metric} index", device, name, backend, bad_rows, 0,
                                      status, dispatch_note or "rows not choosing a (near-)nearest candidate",
                                      seconds))
                error, worst_name = worst(values)
                status = "FAIL" if taken != expected else verdict(error, value_tol)
                results.append(Result(f"nearest_neighbors {metric} distance", device, name, backend, error,
                                      value_tol, status, f"worst: {worst_name}" + (f"; {note}" if note else "")))


def step_checks(results, device, seed):
    modes = ("fused", "graph") if device == "cuda" else ("fused",)
    for dtype in (torch.float64, torch.float32):
        tol, name = STEP_TOLERANCE[dtype], DTYPE_NAMES[dtype]
        for norm in ("group", "batch"):
            start = time.perf_counter()
            try:
                outcome = check_ign_steps(device, dtype, norm, modes, seed)
            except Exception as error:
                results.append(Result(f"IGNStep {'/'.join(modes)} dcgan28-{norm}", device, name, "auto", math.inf,
                                      tol, "FAIL", _failure(error), time.perf_counter() - start))
                continue
            seconds = (time.perf_counter() - start) / (len(modes) + 1)
            for mode, (errors, updates) in outcome.items():
                error, what = worst(errors)
                mode_tol = GRAPH_STEP_TOLERANCE[dtype] if mode == "graph" else tol
                results.append(Result(f"IGNStep {mode} vs reference, dcgan28-{norm}", device, name, "auto", error,
                                      mode_tol, verdict(error, mode_tol), f"{updates} Adam updates; worst: {what}",
                                      seconds))
        start = time.perf_counter()
        try:
            outcome = check_naign_steps(device, dtype, modes, seed)
        except Exception as error:
            results.append(Result(f"NAIGNStep {'/'.join(modes)}", device, name, "auto", math.inf, tol, "FAIL",
                                  _failure(error), time.perf_counter() - start))
            continue
        seconds = (time.perf_counter() - start) / (len(modes) + 1)
        for mode, (errors, updates, against) in outcome.items():
            error, what = worst(errors)
            mode_tol = GRAPH_STEP_TOLERANCE[dtype] if mode == "graph" else tol
            results.append(Result(f"NAIGNStep {mode} vs {against}", device, name, "auto", error, mode_tol,
                                  verdict(error, mode_tol), f"{updates} Adam updates, R=2; worst: {what}", seconds))
    if device == "cpu":
        results.append(Result("IGNStep/NAIGNStep graph", device, status="SKIP",
                              detail="graph mode needs CUDA (on the CPU it runs the fused step)"))


@contextlib.contextmanager
def _isolated():
    """The doctor leaves the process as it found it: RNG state, TF32 flags (off during the checks, see the
    module docstring), the ops backend."""
    from . import ops

    backend = ops.get_backend()
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
            ops.set_backend(backend)


def facts():
    """The build and machine facts printed above the table (and written to --json)."""
    from ._extension import build_info

    info = dict(build_info())
    info["python"] = sys.version.split()[0]
    info["torch_cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    info["cpu_threads"] = torch.get_num_threads()
    info["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "") == "1"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
        info["gpu_count"] = torch.cuda.device_count()
    return info


class _Reported(list):
    """The results list, calling report(result) on each append: the table streams out line by line, so a run
    killed by a timeout (a hung kernel) still shows every check finished before it."""

    def __init__(self, report):
        super().__init__()
        self.report = report

    def append(self, result):
        super().append(result)
        if self.report is not None:
            self.report(result)


def run_checks(devices, backends, ops=True, steps=True, seed=0, report=None):
    """Every check, as a list of Result; report(result), if given, is called as each one finishes."""
    results = _Reported(report)
    build_checks(results)
    with _isolated():
        for device in devices:
            for backend in backends if ops else ():
                op_checks(results, device, backend, seed)
            if steps:
                step_checks(results, device, seed)
    return list(results)


COLUMNS = ("check", "device", "dtype", "backend", "max error", "tolerance", "status", "detail")
# fixed widths (a longer cell widens its own line only), so lines can be printed as the checks finish
WIDTHS = (42, 6, 8, 7, 9, 9, 6)


def format_row(cells):
    return "  ".join(str(cell).ljust(w) for cell, w in zip(cells[:-1], WIDTHS)) + "  " + str(cells[-1])


def format_result(r):
    return format_row((r.check, r.device, r.dtype, r.backend, _fmt(r.error), _fmt(r.tolerance), r.status, r.detail))


def format_table(results):
    return "\n".join([format_row(COLUMNS)] + [format_result(r) for r in results])


def format_facts(info):
    ext = ("loaded" if info["extension_loaded"] else f"NOT loaded ({info['extension_error']})")
    lines = [f"ign_fast doctor: python {info['python']}, torch {info['torch_running']} (CUDA {info['torch_cuda']}), "
             f"triton {info['triton']}",
             f"extension: {ext}; built against torch {info['torch_built_against']}, CUDA kernels "
             f"{'built (CUDA ' + str(info['cuda_built_against']) + ')' if info['cuda_built'] else 'not built'}",
             f"devices: cpu ({info['cpu_threads']} threads)"
             + (f", cuda: {info['gpu']} x{info['gpu_count']}" if info.get("gpu") else ", no CUDA GPU visible")
             + ("; TRITON_INTERPRET=1" if info["triton_interpret"] else "")]
    return "\n".join(lines)


def add_arguments(parser):
    parser.add_argument("--device", default="auto", help="auto (every device present) | cpu | cuda")
    parser.add_argument("--backend", default="all", help="all | a comma list of native, triton, torch")
    parser.add_argument("--checks", default="all", help="all | ops | steps (the training steps only)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default %(default)s)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON here")
    parser.add_argument("--triton-interpret", action="store_true",
                        help="on a machine without a GPU, also check the Triton kernels in triton's interpreter "
                             "(slow; sets TRITON_INTERPRET=1, which must happen before triton is imported)")


def resolve_arguments(args):
    """(devices, backends) from parsed arguments; DoctorUsageError naming the argument on bad usage."""
    present = devices_present()
    if args.device == "auto":
        devices = present
    elif args.device in ("cpu", "cuda"):
        if args.device not in present:
            raise DoctorUsageError("--device cuda: no CUDA GPU is visible to torch")
        devices = [args.device]
    else:
        raise DoctorUsageError(f"--device must be auto, cpu or cuda, got {args.device!r}")
    if args.checks not in ("all", "ops", "steps"):
        raise DoctorUsageError(f"--checks must be all, ops or steps, got {args.checks!r}")
    if args.backend == "all":
        backends = list(BACKENDS)
    else:
        backends = [b.strip() for b in args.backend.split(",") if b.strip()]
        unknown = [b for b in backends if b not in BACKENDS]
        if unknown or not backends:
            raise DoctorUsageError(f"--backend must be all or a comma list of {', '.join(BACKENDS)}, got "
                                   f"{args.backend!r}")
    if args.json is not None:
        folder = os.path.dirname(os.path.abspath(args.json))
        if os.path.isdir(args.json) or not os.path.isdir(folder):
            raise DoctorUsageError(f"--json must be a file in an existing folder, got {args.json!r}")
    if args.triton_interpret:
        if torch.cuda.is_available():
            raise DoctorUsageError("--triton-interpret is for machines without a GPU (the GPU runs triton itself)")
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "") != "1":
            raise DoctorUsageError("--triton-interpret: triton was already imported in this process; set "
                                   "TRITON_INTERPRET=1 before starting Python")
        os.environ["TRITON_INTERPRET"] = "1"
    return devices, backends


def run(args, out=None):
    """The doctor on parsed arguments: prints the facts and the table (to out, default sys.stdout); returns the
    exit status."""
    out = sys.stdout if out is None else out  # looked up now: a caller may have redirected sys.stdout
    devices, backends = resolve_arguments(args)
    start = time.perf_counter()
    info = facts()
    print(format_facts(info) + "\n", file=out, flush=True)
    print(format_row(COLUMNS), file=out, flush=True)
    results = run_checks(devices, backends, ops=args.checks != "steps", steps=args.checks != "ops", seed=args.seed,
                         report=lambda r: print(format_result(r), file=out, flush=True))
    seconds = time.perf_counter() - start
    failed = [r for r in results if r.status == "FAIL"]
    counts = {s: sum(r.status == s for r in results) for s in ("PASS", "FAIL", "SKIP")}
    print(f"\n{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped in {seconds:.1f} s",
          file=out)
    if args.json is not None:
        with open(args.json, "w") as f:
            json.dump({"facts": info, "passed": not failed, "seconds": round(seconds, 2), "counts": counts,
                       "checks": [r.as_dict() for r in results]}, f, indent=2)
    return EXIT_MISMATCH if failed else EXIT_OK


def build_parser(prog="ign-fast doctor"):
    parser = argparse.ArgumentParser(prog=prog, description="Build facts, then every op and training step "
                                     "checked against the PyTorch reference on this machine.")
    add_arguments(parser)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)  # argparse exits 2 with one usage line on bad syntax
    try:
        return run(args)
    except DoctorUsageError as error:
        print(f"ign-fast doctor: error: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
