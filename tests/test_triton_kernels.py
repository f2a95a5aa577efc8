"""The Triton kernels (kernels/ign_loss.py, kernels/per_sample_distance.py) against the reference. Without a
GPU they run under TRITON_INTERPRET=1 (tests/conftest.py sets it), so sizes stay small."""
import os
import subprocess
import sys

import pytest
import torch

import ign_fast
from ign_fast import ops, reference

from conftest import devices
from test_ign_loss import CONFIGS, ROLES, loss_and_grads, make_inputs

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from ign_fast.kernels.ign_loss import _tanh  # noqa: E402


def triton_device(device):
    t = torch.empty(0, device=device)
    if not ops.triton_available(t):
        pytest.skip(f"Triton cannot run on {device} here (no GPU and TRITON_INTERPRET unset)")
    return device


@pytest.fixture
def use_triton():
    ign_fast.set_backend("triton")
    yield
    ign_fast.set_backend("auto")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind, ratio", CONFIGS)
@pytest.mark.parametrize("shape, same_ffz", [((1, 1), False), ((3, 47), True), ((2, 3, 5, 7), False),
                                             ((1, 9000), True), ((2, 8200), False)])
def test_ign_loss_matches_reference(use_triton, device, kind, ratio, shape, same_ffz):
    triton_device(device)
    inputs = make_inputs(shape, torch.float32, device, same_ffz=same_ffz)
    if same_ffz:  # one storage in both roles: the kernels read it once
        inputs[4] = inputs[3].detach().requires_grad_()
    assert ops.kernel_path(inputs[0]) == "triton"
    weights = [torch.randn(shape[0], device=device) for _ in range(3)]
    for w in (None, weights):
        out, grads = loss_and_grads(ops.ign_loss, inputs, w, kind=kind, tight_clamp_ratio=ratio)
        ref_out, ref_grads = loss_and_grads(reference.ign_loss, inputs, w, kind=kind, tight_clamp_ratio=ratio)
        for name, a, b in zip(("total", "rec", "idem", "tight") + ROLES, out + grads, ref_out + ref_grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_ign_loss_dtypes(use_triton, device, dtype):
    triton_device(device)
    inputs = make_inputs((3, 2, 21), dtype, device)
    exact = [t.detach().double().requires_grad_() for t in inputs]
    out, grads = loss_and_grads(ops.ign_loss, inputs, kind="l1", tight_clamp_ratio=1.5)
    ref_out, ref_grads = loss_and_grads(reference.ign_loss, exact, kind="l1", tight_clamp_ratio=1.5)
    plain_out, plain_grads = loss_and_grads(reference.ign_loss, inputs, kind="l1", tight_clamp_ratio=1.5)
    assert out[0].dtype == reference.accumulate_dtype(dtype)
    for a, p, e in zip(out + grads, plain_out + plain_grads, ref_out + ref_grads):
        assert a.dtype == p.dtype
        floor = (1e-5 if dtype != torch.float64 else 1e-13) * float(e.abs().max())
        assert float((a.double() - e).abs().max()) <= 2 * float((p.double() - e).abs().max()) + floor


@pytest.mark.parametrize("device", devices())
def test_ign_loss_rec_zero_and_batch_mismatch(use_triton, device):
    triton_device(device)
    inputs = make_inputs((4, 3, 5), torch.float32, device)
    with torch.no_grad():
        inputs[1][2] = inputs[0][2]
    out, grads = loss_and_grads(ops.ign_loss, inputs, kind="l2", tight_clamp_ratio=1.5)
    ref_out, ref_grads = loss_and_grads(reference.ign_loss, inputs, kind="l2", tight_clamp_ratio=1.5)
    assert float(out[1][2]) == 0.0
    for a, b in zip(out + grads, ref_out + ref_grads):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    inputs = make_inputs((2, 9), torch.float32, device, batch_z=5)
    out, grads = loss_and_grads(ops.ign_loss, inputs, kind="l1", tight_clamp_ratio=None)
    ref_out, ref_grads = loss_and_grads(reference.ign_loss, inputs, kind="l1", tight_clamp_ratio=None)
    for a, b in zip(out + grads, ref_out + ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device", devices())
def test_ign_loss_same_storage_other_strides(use_triton, device):
    triton_device(device)
    inputs = make_inputs((2, 4, 4), torch.float32, device)
    inputs[4] = inputs[3].detach().transpose(1, 2).requires_grad_()
    out, grads = loss_and_grads(ops.ign_loss, inputs, kind="l2")
    ref_out, ref_grads = loss_and_grads(reference.ign_loss, inputs, kind="l2")
    for a, b in zip(out + grads, ref_out + ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device", devices())
def test_ign_loss_channels_last(use_triton, device):
    triton_device(device)
    inputs = [t.detach().to(memory_format=torch.channels_last).requires_grad_()
              for t in make_inputs((2, 3, 4, 5), torch.float32, device)]
    out, grads = loss_and_grads(ops.ign_loss, inputs)
    ref_out, ref_grads = loss_and_grads(reference.ign_loss, inputs)
    for a, b in zip(out + grads, ref_out + ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", ["l1", "l2"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 47), (2, 3, 4, 5), (1, 9000)])
def test_per_sample_distance_matches_reference(use_triton, device, kind, shape):
    triton_device(device)
    a = torch.randn(shape, device=device, requires_grad=True)
    b = torch.randn(shape, device=device, requires_grad=True)
    w = torch.randn(shape[0], device=device)
    out = ign_fast.per_sample_distance(a, b, kind)
    ga, gb = torch.autograd.grad((out * w).sum(), (a, b))
    ref = reference.per_sample_distance(a, b, kind)
    ra, rb = torch.autograd.grad((ref * w).sum(), (a, b))
    for x, y in ((out, ref), (ga, ra), (gb, rb)):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("device", devices())
def test_opcheck(device):
    triton_device(device)
    tops = ops.triton_ops()
    # Under the interpreter wrap_triton does not turn the kernel into a traceable call, so torch.compile's
    # tracing (test_aot_dispatch_dynamic) would hand the interpreter storage-less tensors; on a GPU it runs.
    checks = None if device == "cuda" else ("test_schema", "test_autograd_registration", "test_faketensor")

    def opcheck(op, args):
        if checks is None:
            torch.library.opcheck(op, args)
        else:
            torch.library.opcheck(op, args, test_utils=checks)

    a, b = torch.randn(3, 5, device=device, requires_grad=True), torch.randn(3, 5, device=device)
    opcheck(tops.per_sample_distance, (a, b, "l1"))
    for kind, ratio in (("l1", 1.5), ("l2", None)):
        t = make_inputs((2, 6), torch.float32, device)
        opcheck(tops.ign_loss, (*t, kind, 2.0, 3.0, 0.5, ratio))
        d = [u.detach() for u in t]
        out = tops.ign_loss(*d, kind, 2.0, 3.0, 0.5, ratio)
        opcheck(torch.ops.ign_fast.ign_loss_backward_triton.default,
                (torch.tensor(1.5, device=device), torch.randn(2, device=device), None, None, *d, out[1], out[4],
                 kind, 2.0, 3.0, 0.5, ratio, True))


# ----------------------------------------------------------------------------------- float64 is float64
# λ and the clamp ratio used to reach the kernels as float32 and _tanh's series was accurate to ~1e-9, so a
# float64 loss agreed with the float64 reference to 1e-7 only. Now it must agree to float64 rounding.

F64 = dict(atol=1e-13, rtol=1e-12)


@triton.jit
def _tanh_kernel(v_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, _tanh(tl.load(v_ptr + offs, mask=mask)), mask=mask)


@pytest.mark.parametrize("device", devices())
def test_tanh_is_float64_accurate(device):
    triton_device(device)
    # both branches and the switch at |v| = 1/8, both signs, 0, tiny values and the clamp's limit 20
    f64 = dict(dtype=torch.float64)
    mags = torch.cat([torch.logspace(-12, 0, 60, **f64), torch.linspace(0.12, 0.13, 21, **f64),
                      torch.tensor([0.125, 0.5, 1.0, 3.0, 10.0, 19.99, 20.0], **f64)])
    v = torch.cat([mags, -mags, torch.zeros(1, dtype=torch.float64)]).to(device)
    out = torch.empty_like(v)
    _tanh_kernel[(1,)](v, out, v.numel(), BLOCK=triton.next_power_of_2(v.numel()))
    expected = torch.tanh(v)
    rel = ((out - expected).abs() / expected.abs().clamp_min(1e-300)).max()
    assert float(rel) < 1e-15, f"worst relative error {float(rel):.3g}"  # measured: 2 eps (4.4e-16)
    assert torch.equal(out[-1:], torch.zeros(1, dtype=torch.float64, device=device))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind, ratio", CONFIGS)
def test_ign_loss_float64_matches_reference_to_float64_precision(use_triton, device, kind, ratio):
    triton_device(device)
    x, fx, fz, f_fz, ff_z = (t.detach() for t in make_inputs((4, 3, 7), torch.float64, device))
    # ff_z from very near fz to far from it: tight/(ratio·rec) on both sides of _tanh's switch at 1/8
    spread = torch.tensor([1e-4, 3e-2, 0.3, 2.0], dtype=torch.float64, device=device).view(4, 1, 1)
    ff_z = fz + spread * torch.randn_like(fz)
    inputs = [t.requires_grad_() for t in (x, fx, fz, f_fz, ff_z)]
    assert ops.kernel_path(inputs[0]) == "triton"
    # λ and the ratio with digits beyond float32: rounded to float32 they would differ by ~1e-8 relative
    config = dict(kind=kind, lambda_rec=20.123456789012345, lambda_idem=3.3333333333333335,
                  lambda_tight=0.7000000000000001, tight_clamp_ratio=None if ratio is None else 1.4142135623730951)
    weights = [torch.randn(4, dtype=torch.float64, device=device) for _ in range(3)]
    for w in (None, weights):
        out, grads = loss_and_grads(ops.ign_loss, inputs, w, **config)
        ref_out, ref_grads = loss_and_grads(reference.ign_loss, inputs, w, **config)
        for name, a, b in zip(("total", "rec", "idem", "tight") + ROLES, out + grads, ref_out + ref_grads):
            assert a.dtype == torch.float64, name
            torch.testing.assert_close(a, b, **F64, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_per_sample_distance_float64(use_triton, device, kind):
    triton_device(device)
    # odd sizes, a non-contiguous view, and a row split into two chunks (8,200 > 8,192)
    a = torch.randn(3, 8200, dtype=torch.float64, device=device)[:, ::1]
    b = torch.randn(8200, 3, dtype=torch.float64, device=device).t()
    assert not b.is_contiguous()
    a.requires_grad_()
    b.requires_grad_()
    assert ops.kernel_path(a) == "triton"
    w = torch.randn(3, dtype=torch.float64, device=device)
    out = ign_fast.per_sample_distance(a, b, kind)
    ga, gb = torch.autograd.grad((out * w).sum(), (a, b))
    ref = reference.per_sample_distance(a, b, kind)
    ra, rb = torch.autograd.grad((ref * w).sum(), (a, b))
    for x, y in ((out, ref), (ga, ra), (gb, rb)):
        assert x.dtype == torch.float64
        torch.testing.assert_close(x, y, **F64)


# ------------------------------------------------------------------------------- backend choice, launches

def test_triton_backend_falls_back_where_triton_cannot_run(use_triton, monkeypatch):
    """set_backend("triton") with CPU tensors and no interpreter: every op takes the C++ kernel (or the
    reference without the extension) instead of raising; nearest_neighbors used to call the Triton kernel
    unconditionally and raise "the Triton backend needs a CUDA GPU"."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # ops.triton_available reads it at call time
    q, c = torch.randn(5, 2, 3), torch.randn(17, 6)
    assert ops.kernel_path(q) == ("native" if ign_fast.build_info()["extension_loaded"] else "torch")
    index, distance = ign_fast.nearest_neighbors(q, c, "l1")
    ref = reference.nearest_neighbors(q, c, "l1")
    assert torch.equal(index, ref[0])
    torch.testing.assert_close(distance, ref[1])
    a, b = torch.randn(3, 7), torch.randn(3, 7)
    torch.testing.assert_close(ign_fast.per_sample_distance(a, b, "l2"), reference.per_sample_distance(a, b, "l2"))
    inputs = make_inputs((2, 5))
    out, grads = loss_and_grads(ops.ign_loss, inputs)
    ref_out, ref_grads = loss_and_grads(reference.ign_loss, inputs)
    for x, y in zip(out + grads, ref_out + ref_grads):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("device", devices())
def test_every_launch_is_guarded_by_the_tensors_device(use_triton, device, monkeypatch):
    """Each Triton launch runs inside kernels._common.on_device(tensor). On the CPU this can only check that
    the guard is taken for every launch and that the ops still agree with the reference; that the guard
    really moves a cuda:1 launch off device 0 is test_tensors_on_the_second_gpu (needs two GPUs)."""
    triton_device(device)
    from ign_fast.kernels import _common
    from ign_fast.kernels import ign_loss as ign_loss_kernels
    from ign_fast.kernels import nearest_neighbors as neighbor_kernels
    from ign_fast.kernels import per_sample_distance as distance_kernels

    guarded = []

    def recording_on_device(t):
        guarded.append(t.device)
        return _common.on_device(t)

    for module in (ign_loss_kernels, neighbor_kernels, distance_kernels):
        monkeypatch.setattr(module, "on_device", recording_on_device)
    a = torch.randn(3, 9, device=device, requires_grad=True)
    b = torch.randn(3, 9, device=device)
    ign_fast.per_sample_distance(a, b).sum().backward()  # forward and backward: two guarded launches
    assert len(guarded) == 2
    inputs = make_inputs((2, 5), device=device)
    loss_and_grads(ops.ign_loss, inputs)  # partials + finalize under one guard, then backward
    assert len(guarded) == 4
    ign_fast.nearest_neighbors(torch.randn(4, 6, device=device), torch.randn(9, 6, device=device))
    assert len(guarded) == 5 and all(d.type == torch.device(device).type for d in guarded)


def test_on_device_enters_the_tensors_cuda_device(monkeypatch):
    """on_device(t) for a tensor on cuda:1 is torch.cuda.device(cuda:1) (stood in for here: no GPU needed)."""
    from ign_fast.kernels import _common

    entered = []

    class RecordingDevice:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    class OnSecondGpu:
        device = torch.device("cuda", 1)

    monkeypatch.setattr(torch.cuda, "device", RecordingDevice)
    with _common.on_device(OnSecondGpu()):
        pass
    assert entered == [torch.device("cuda", 1)]
    with _common.on_device(torch.empty(1)):  # CPU (the interpreter): no CUDA device is entered
        pass
    assert entered == [torch.device("cuda", 1)]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_tensors_on_the_second_gpu(use_triton):
    assert torch.cuda.current_device() == 0
    device = "cuda:1"
    a, b = torch.randn(4, 9000, device=device), torch.randn(4, 9000, device=device)
    torch.testing.assert_close(ign_fast.per_sample_distance(a, b), reference.per_sample_distance(a, b))
    inputs = make_inputs((3, 70), device=device)
    out, grads = loss_and_grads(ops.ign_loss, inputs)
    ref_out, ref_grads = loss_and_grads(reference.ign_loss, inputs)
    for x, y in zip(out + grads, ref_out + ref_grads):
        assert x.device == torch.device(device)
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)
    q, c = torch.randn(8, 33, device=device), torch.randn(100, 33, device=device)
    index, _ = ign_fast.nearest_neighbors(q, c)
    assert torch.equal(index, reference.nearest_neighbors(q, c)[0])
    assert torch.cuda.current_device() == 0


@pytest.mark.parametrize("device", devices())
def test_nearest_neighbors_triton_is_a_registered_op(use_triton, device):
    """ign_fast::nearest_neighbors_triton passes opcheck and torch.compile(fullgraph=True) traces it as one op
    (it used to be a plain Python function that launched the kernel: untraceable)."""
    triton_device(device)
    tops = ops.triton_ops()
    assert tops.nearest_neighbors is not None
    # as test_opcheck: under the interpreter the AOT tracing tests would hand the kernel storage-less tensors
    checks = {} if device == "cuda" else dict(test_utils=("test_schema", "test_autograd_registration",
                                                          "test_faketensor"))
    for dtype in (torch.float32, torch.float64):
        q, c = torch.randn(5, 7, device=device, dtype=dtype), torch.randn(11, 7, device=device, dtype=dtype)
        torch.library.opcheck(torch.ops.ign_fast.nearest_neighbors_triton.default, (q, c, "l1"), **checks)

    seen = []

    def recording_backend(gm, example_inputs):
        seen.extend(node.target for node in gm.graph.nodes if node.op == "call_function")
        return gm

    q, c = torch.randn(6, 2, 5, device=device), torch.randn(30, 10, device=device)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(lambda q, c: ign_fast.nearest_neighbors(q, c, "l2"), backend=recording_backend,
                                 fullgraph=True)
        index, distance = compiled(q, c)
        if device == "cuda":  # AOT tracing through the op's body works where wrap_triton can trace: a GPU
            aot = torch.compile(lambda q, c: ign_fast.nearest_neighbors(q, c, "l2"), backend="aot_eager",
                                fullgraph=True)
            assert torch.equal(aot(q, c)[0], index)
    finally:
        torch._dynamo.reset()
    assert torch.ops.ign_fast.nearest_neighbors_triton.default in seen
    ref = reference.nearest_neighbors(q, c, "l2")
    assert torch.equal(index, ref[0])
    torch.testing.assert_close(distance, ref[1])


PTX_SCRIPT = r"""
import os
os.environ.pop("TRITON_INTERPRET", None)  # compile for a real GPU target (no GPU is needed to compile)
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ign_fast.kernels import ign_loss as K
SCALARS = ("lambda_rec", "lambda_idem", "lambda_tight", "ratio")
def ptx(fn, acc, consts):
    sig = {}
    for p in fn.params:
        if p.name in consts:
            sig[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            sig[p.name] = "*fp64" if acc == tl.float64 else "*fp32"
        elif p.name in SCALARS:  # as triton types a Python float argument: its annotation, else fp32
            sig[p.name] = p.annotation_type or "fp32"
        else:
            sig[p.name] = "i32"
    names = list(sig)
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
for acc in (tl.float64, tl.float32):
    common = dict(HAS_CLAMP=True, ACC=acc, EPS=1e-12, LIMIT=20.0)
    fin = ptx(K._finalize_kernel, acc, dict(BLOCK_R=4, **common))
    bwd = ptx(K._backward_kernel, acc, dict(L1=True, ALIASED=False, HAS_ROW_GRADS=True, WRITE_X=True, CHUNK=256,
                                            BLOCK=256, **common))
    print(acc, fin.count(".param .f64"), bwd.count(".param .f64"), fin.count("ex2.approx"),
          bwd.count("mul.rn.f64") + bwd.count("fma.rn.f64"))
"""


def test_compiled_kernels_take_lambdas_and_ratio_as_float64():
    """What the interpreter cannot show (it passes Python floats through unconverted): compiled for an sm_90
    target, the loss kernels take λ and the clamp ratio as float64 parameters; the float64 kernels use the
    exact exp (no ex2.approx); the float32 backward does no float64 arithmetic. Needs triton's bundled ptxas,
    not a GPU; in a subprocess because this process runs triton in interpreter mode."""
    out = subprocess.run([sys.executable, "-c", PTX_SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {line.split()[0]: [int(v) for v in line.split()[1:]] for line in out.stdout.splitlines()}
    f64_params_fin, f64_params_bwd, approx_exp, f64_math = rows["fp64"]
    assert (f64_params_fin, f64_params_bwd, approx_exp) == (4, 4, 0) and f64_math > 0, out.stdout
    f64_params_fin, f64_params_bwd, _, f64_math = rows["fp32"]
    assert (f64_params_fin, f64_params_bwd, f64_math) == (4, 4, 0), out.stdout


def test_auto_keeps_cuda_tensors_on_the_reference_until_the_gpu_kernels_are_verified(monkeypatch):
    # the rule: a path never executed on a GPU is opt-in there
    import types


    cuda_like = types.SimpleNamespace(device=torch.device("cuda"))  # kernel_path reads only the device
    monkeypatch.setattr(ops, "_backend", "auto")
    assert not ops.GPU_KERNELS_VERIFIED
    assert ops.kernel_path(cuda_like) == "torch"
    assert ops.kernel_path(torch.empty(2, 3)) == "native"


def test_ign_fast_backend_variable_sets_the_backend_at_import():
    code = "import ign_fast; print(ign_fast.get_backend())"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "IGN_FAST_BACKEND": "torch"},
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "torch", out.stderr[-500:]
    bad = subprocess.run([sys.executable, "-c", code], env={**os.environ, "IGN_FAST_BACKEND": "cuda"},
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "IGN_FAST_BACKEND must be one of auto, native, triton, torch" in bad.stderr
