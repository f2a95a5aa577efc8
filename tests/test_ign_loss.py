"""ign_fast::ign_loss (the fused IGN objective) against reference.ign_loss, through the op registry."""
import subprocess
import sys

import pytest
import torch
from torch.library import opcheck

import ign_fast
from ign_fast import ops, reference
from ign_fast.objectives import IGNLoss

from conftest import assert_native, devices, requires_ext

pytestmark = pytest.mark.kernels

ROLES = ("x", "fx", "fz", "f_fz", "ff_z")
CONFIGS = [("l1", 1.5), ("l1", None), ("l2", 1.5), ("l2", None)]


def make_inputs(shape, dtype=torch.float32, device="cpu", batch_z=None, same_ffz=False, spread=0.3):
    """x, fx near x, fz, and f_fz, ff_z near fz: the regime training sees (|tight| ~ rec, the clamp active)."""
    zshape = (batch_z if batch_z is not None else shape[0],) + tuple(shape[1:])
    x = torch.randn(shape, device=device, dtype=torch.float64)
    fx = x + spread * torch.randn_like(x)
    fz = torch.randn(zshape, device=device, dtype=torch.float64)
    f_fz = fz + spread * torch.randn_like(fz)
    ff_z = f_fz.clone() if same_ffz else fz + spread * torch.randn_like(fz)
    return [t.to(dtype).requires_grad_() for t in (x, fx, fz, f_fz, ff_z)]


def loss_and_grads(fn, inputs, weights=None, **config):
    """The four outputs, and the gradients of total (plus weighted per-sample outputs) w.r.t. every input."""
    out = fn(*inputs, **config)
    objective = out[0]
    if weights is not None:
        objective = objective + sum((o * w).sum() for o, w in zip(out[1:], weights))
    grads = torch.autograd.grad(objective, inputs, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads)]
    return [o.detach() for o in out], grads


def fused(*inputs, **config):
    return ops.ign_loss(*inputs, **config)


def ref(*inputs, **config):
    return reference.ign_loss(*inputs, **config)


def assert_matches_reference(inputs, atol, rtol, weights=None, **config):
    assert_native(inputs[0])
    out, grads = loss_and_grads(fused, inputs, weights, **config)
    ref_out, ref_grads = loss_and_grads(ref, inputs, weights, **config)
    for name, a, b in zip(("total", "rec", "idem", "tight"), out, ref_out):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
    for name, a, b in zip(ROLES, grads, ref_grads):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"grad {name}: {m}")


@requires_ext
@pytest.mark.parametrize("kind, ratio", CONFIGS)
def test_gradcheck_float64(kind, ratio):
    # (aliased f_fz/ff_z cannot be gradchecked: perturbing one perturbs the other; see the aliasing test)
    inputs = make_inputs((3, 2, 5), torch.float64)
    config = dict(kind=kind, lambda_rec=2.0, lambda_idem=3.0, lambda_tight=1.5, tight_clamp_ratio=ratio)
    # fz enters the tight term through sg: finite differences see that path, autograd must not. So fz is
    # held constant here, and checked below where no output depends on fz through the tight term.
    x, fx, fz, f_fz, ff_z = inputs
    fz_const = fz.detach()
    assert torch.autograd.gradcheck(lambda x, fx, f_fz, ff_z: ops.ign_loss(x, fx, fz_const, f_fz, ff_z, **config),
                                    (x, fx, f_fz, ff_z))
    config["lambda_tight"] = 0.0
    assert torch.autograd.gradcheck(lambda *t: ops.ign_loss(*t, **config)[:3], inputs)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind, ratio", CONFIGS)
@pytest.mark.parametrize("shape", [(1, 1), (3, 47), (257, 47), (3, 1, 28, 28), (2, 3, 64, 64), (1, 3, 256, 256)])
def test_float32_matches_reference(device, kind, ratio, shape):
    inputs = make_inputs(shape, torch.float32, device)
    assert_matches_reference(inputs, 1e-5, 1e-4, kind=kind, tight_clamp_ratio=ratio)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind, ratio", CONFIGS)
def test_per_sample_output_gradients(device, kind, ratio):
    # rec, idem and tight are outputs too: their own upstream gradients must reach the inputs
    inputs = make_inputs((5, 3, 7), torch.float64, device)
    weights = [torch.randn(5, device=device, dtype=torch.float64) for _ in range(3)]
    assert_matches_reference(inputs, 1e-10, 1e-9, weights, kind=kind, tight_clamp_ratio=ratio)
    # and only one of them used (the others reach backward as None)
    out = ops.ign_loss(*inputs, kind=kind, tight_clamp_ratio=ratio)
    grads = torch.autograd.grad(out[3].sum(), inputs, allow_unused=True)
    ref_out = reference.ign_loss(*inputs, kind=kind, tight_clamp_ratio=ratio)
    ref_grads = torch.autograd.grad(ref_out[3].sum(), inputs, allow_unused=True)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g if g is not None else torch.zeros_like(inputs[0]),
                                   r if r is not None else torch.zeros_like(inputs[0]), atol=1e-10, rtol=1e-9)


def max_error(values, reference_values):
    return max(float((a.double() - b.double()).abs().max()) for a, b in zip(values, reference_values))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind, ratio", CONFIGS)
@pytest.mark.parametrize("shape", [(3, 47), (4, 3, 32, 32), (1, 3, 256, 256)])
def test_low_precision_error_at_most_twice_torch(device, dtype, kind, ratio, shape):
    inputs = make_inputs(shape, dtype, device)
    # fp32 reference on the same (already rounded) values: only the computation's error is measured
    exact = [t.detach().float().requires_grad_() for t in inputs]
    ref_out, ref_grads = loss_and_grads(ref, exact, kind=kind, tight_clamp_ratio=ratio)
    out, grads = loss_and_grads(fused, inputs, kind=kind, tight_clamp_ratio=ratio)
    torch_out, torch_grads = loss_and_grads(ref, inputs, kind=kind, tight_clamp_ratio=ratio)
    for ours, plain, exact_values in ((out, torch_out, ref_out), (grads, torch_grads, ref_grads)):
        for a, p, e in zip(ours, plain, exact_values):
            floor = 1e-5 * float(e.abs().max()) + 1e-30  # float32 accumulation order
            assert max_error([a], [e]) <= 2 * max_error([p], [e]) + floor


@pytest.mark.parametrize("device", devices())
def test_float64_on_cpu_and_batch_sizes(device):
    for batch in (1, 3, 257):
        inputs = make_inputs((batch, 47), torch.float64, device)
        assert_matches_reference(inputs, 1e-12, 1e-10, kind="l1", tight_clamp_ratio=1.5)
        out = ops.ign_loss(*inputs)
        assert out[0].dtype == torch.float64 and out[0].dim() == 0
        assert all(o.shape == (batch,) for o in out[1:])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_noncontiguous_and_channels_last(device, kind):
    base = make_inputs((6, 3, 10, 12), torch.float32, device)
    strided = [t.detach()[::2, :, 1:, ::2].requires_grad_() for t in base]
    assert not strided[0].is_contiguous()
    assert_matches_reference(strided, 1e-5, 1e-4, kind=kind)
    last = [t.detach().to(memory_format=torch.channels_last).requires_grad_() for t in base]
    assert_matches_reference(last, 1e-5, 1e-4, kind=kind)
    transposed = [t.detach().transpose(2, 3).requires_grad_() for t in base]
    assert_matches_reference(transposed, 1e-5, 1e-4, kind=kind)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", ["l1", "l2"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rec_exactly_zero(device, kind, dtype):
    # A sample reconstructed exactly (fx_i == x_i): the clamp takes its limit, finite in value and gradient
    inputs = make_inputs((4, 3, 5), dtype, device)
    with torch.no_grad():
        inputs[1][1] = inputs[0][1]
        inputs[1][3] = inputs[0][3]
    out, grads = loss_and_grads(fused, inputs, kind=kind, tight_clamp_ratio=1.5)
    assert float(out[1][1]) == 0.0 and float(out[3][1]) == 0.0
    assert all(torch.isfinite(o).all() for o in out) and all(torch.isfinite(g).all() for g in grads)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert_matches_reference(inputs, tol, tol, kind=kind, tight_clamp_ratio=1.5)
    # d tight_1 / d rec_1 = ratio·sign(t_1) at rec = 0 reaches grad_rec's coefficient: check it with a
    # per-sample upstream gradient on tight only
    weights = [torch.zeros(4, device=device, dtype=dtype), torch.zeros(4, device=device, dtype=dtype),
               torch.ones(4, device=device, dtype=dtype)]
    assert_matches_reference(inputs, tol, tol, weights, kind=kind, tight_clamp_ratio=1.5)


@pytest.mark.parametrize("device", devices())
def test_clamp_saturated_and_tiny_rec(device):
    # |t/(ratio·rec)| beyond the clip limit, and a·rec just above and below CLAMP_SCALE_EPS
    inputs = make_inputs((4, 16), torch.float64, device)
    with torch.no_grad():
        inputs[1][0] = inputs[0][0] + 1e-9                   # rec ~ 1e-9 (l1): u >> 20, saturated
        inputs[1][1] = inputs[0][1] + 5e-13                  # ratio·rec ~ 7.5e-13 < eps
        inputs[1][2] = inputs[0][2] + 2e-12                  # ratio·rec ~ 3e-12 > eps
    for kind in ("l1", "l2"):
        assert_matches_reference(inputs, 1e-12, 1e-9, kind=kind, tight_clamp_ratio=1.5)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("zero", ["lambda_rec", "lambda_idem", "lambda_tight"])
def test_each_lambda_zero(device, zero):
    inputs = make_inputs((3, 2, 9), torch.float64, device)
    config = {"lambda_rec": 2.0, "lambda_idem": 3.0, "lambda_tight": 0.5, zero: 0.0}
    assert_matches_reference(inputs, 1e-12, 1e-10, kind="l1", tight_clamp_ratio=1.5, **config)
    _, grads = loss_and_grads(fused, inputs, kind="l1", tight_clamp_ratio=None, **config)
    silent = {"lambda_rec": ["fx", "x"], "lambda_idem": ["f_fz", "fz"], "lambda_tight": ["ff_z"]}[zero]
    for name in silent:  # without the clamp, a zero weight leaves its term's inputs without gradient
        assert torch.equal(grads[ROLES.index(name)], torch.zeros_like(grads[0]))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind, ratio", CONFIGS)
def test_aliased_ffz_gives_each_role_its_gradient(device, kind, ratio):
    distinct = make_inputs((3, 4, 6), torch.float32, device, same_ffz=True)
    assert torch.equal(distinct[3], distinct[4]) and distinct[3].data_ptr() != distinct[4].data_ptr()
    out, grads = loss_and_grads(fused, distinct, kind=kind, tight_clamp_ratio=ratio)
    # one storage in both roles, as a fused step passes it (t and t.detach())
    t = distinct[3].detach().clone().requires_grad_()
    t_detached = t.detach().requires_grad_()
    assert t_detached.data_ptr() == t.data_ptr()
    aliased = [distinct[0], distinct[1], distinct[2], t, t_detached]
    out_a, grads_a = loss_and_grads(fused, aliased, kind=kind, tight_clamp_ratio=ratio)
    for a, b in zip(out, out_a):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    for a, b in zip(grads, grads_a):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.equal(grads_a[3], grads_a[4])  # the roles differ: idem vs tight
    # the same Python tensor twice collects both roles' gradients
    _, grads_same = loss_and_grads(fused, [distinct[0], distinct[1], distinct[2], t, t], kind=kind,
                                   tight_clamp_ratio=ratio)
    torch.testing.assert_close(grads_same[3], grads[3] + grads[4])


@pytest.mark.parametrize("device", devices())
def test_same_storage_other_strides_is_not_aliasing(device):
    # ff_z starting at f_fz's first byte but with other strides holds other values: both must be read
    inputs = make_inputs((3, 4, 4), torch.float64, device)
    inputs[4] = inputs[3].detach().transpose(1, 2).requires_grad_()
    assert inputs[4].data_ptr() == inputs[3].data_ptr() and not torch.equal(inputs[3], inputs[4])
    assert_matches_reference(inputs, 1e-12, 1e-10, kind="l2", tight_clamp_ratio=1.5)


@pytest.mark.parametrize("device", devices())
def test_different_batch_sizes_without_clamp(device):
    inputs = make_inputs((5, 7), torch.float64, device, batch_z=3)
    assert_matches_reference(inputs, 1e-12, 1e-10, kind="l2", tight_clamp_ratio=None)
    inputs = make_inputs((2, 7), torch.float64, device, batch_z=6)
    assert_matches_reference(inputs, 1e-12, 1e-10, kind="l1", tight_clamp_ratio=None)


@pytest.mark.parametrize("device", devices())
def test_x_gradient_only_when_needed(device):
    x, fx, fz, f_fz, ff_z = make_inputs((3, 11), torch.float32, device)
    x = x.detach()  # data: no gradient wanted
    total = ops.ign_loss(x, fx, fz, f_fz, ff_z)[0]
    total.backward()
    assert x.grad is None and fx.grad is not None and fz.grad is not None


def test_ignloss_module_uses_the_op_and_matches_reference():
    inputs = make_inputs((4, 1, 6, 6), torch.float32)
    module = IGNLoss()
    out, grads = loss_and_grads(lambda *t: module(*t), inputs)
    ref_out, ref_grads = loss_and_grads(ref, inputs, kind="l1", lambda_rec=20.0, lambda_idem=20.0,
                                        lambda_tight=2.5, tight_clamp_ratio=1.5)
    for a, b in zip(out + grads, ref_out + ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert_native(inputs[0])
    ign_fast.set_backend("torch")
    try:
        assert ops.kernel_path(inputs[0]) == "torch"
        torch_out = module(*inputs)
    finally:
        ign_fast.set_backend("auto")
    torch.testing.assert_close(torch_out[0], ref_out[0])


@pytest.mark.parametrize("bad, message", [
    (lambda t: ops.ign_loss(t[0], t[1][:, :3], *t[2:]), "fx must have the shape of x"),
    (lambda t: ops.ign_loss(*t[:3], t[3].double(), t[4]), "f_fz must have the dtype of fz"),
    (lambda t: ops.ign_loss(*t[:4], t[4][:2]), "ff_z must have the shape of fz"),
    (lambda t: ops.ign_loss(t[0], t[1], t[2][:, :3], t[3][:, :3], t[4][:, :3]), "per-sample shape"),
    (lambda t: ops.ign_loss(*t, kind="cos"), "kind must be"),
    (lambda t: ops.ign_loss(*t, lambda_rec=-1.0), "lambda_rec must be a finite number"),
    (lambda t: ops.ign_loss(*t, lambda_tight="a"), "lambda_tight must be a number"),
    (lambda t: ops.ign_loss(*t, tight_clamp_ratio=0.0), "tight_clamp_ratio must be > 0"),
    (lambda t: ops.ign_loss(t[0], t[1], t[2][:2], t[3][:2], t[4][:2]), "batch size of x"),
    (lambda t: ops.ign_loss(t[0][:0], t[1][:0], *t[2:]), "at least one sample"),
    (lambda t: ops.ign_loss([1.0], *t[1:]), "must be a torch.Tensor"),
    (lambda t: ops.ign_loss(*(u.long() for u in t)), "float"),
])
def test_bad_input_is_one_clear_line(bad, message):
    inputs = [t.detach() for t in make_inputs((3, 5))]
    with pytest.raises((ValueError, TypeError), match=message) as info:
        bad(inputs)
    assert "\n" not in str(info.value)


@requires_ext
@pytest.mark.parametrize("bad_call, message", [
    (lambda op, t: op(t[0], t[1][:, :3], *t[2:], "l1", 1.0, 1.0, 1.0, None), "fx must have the shape of x"),
    (lambda op, t: op(*t, "l3", 1.0, 1.0, 1.0, None), "kind must be"),
    (lambda op, t: op(*(u.int() for u in t), "l1", 1.0, 1.0, 1.0, None), "must be float"),
    (lambda op, t: op(*t[:4], t[4].double(), "l1", 1.0, 1.0, 1.0, None), "ff_z must have the dtype of fz"),
    (lambda op, t: op(t[0], t[1], t[2][:, :2], t[3][:, :2], t[4][:, :2], "l1", 1.0, 1.0, 1.0, None),
     "per-sample shape"),
    (lambda op, t: op(t[0][:0], t[1][:0], *t[2:], "l1", 1.0, 1.0, 1.0, None), "x must hold at least one"),
    (lambda op, t: op(t[0][:, :0], t[1][:, :0], t[2][:, :0], t[3][:, :0], t[4][:, :0], "l1", 1.0, 1.0, 1.0, None),
     "at least one element per sample"),
    (lambda op, t: op(*t, "l1", -1.0, 1.0, 1.0, None), "lambda_rec"),
    (lambda op, t: op(*t, "l1", 1.0, 1.0, 1.0, 0.0), "tight_clamp_ratio"),
    (lambda op, t: op(t[0], t[1], t[2][:2], t[3][:2], t[4][:2], "l1", 1.0, 1.0, 1.0, 1.5), "batch size of x"),
])
def test_kernel_checks_its_inputs(bad_call, message):
    # Callers of torch.ops.ign_fast.* directly bypass the Python checks: the kernels check too.
    inputs = [t.detach() for t in make_inputs((3, 5))]
    with pytest.raises(RuntimeError, match=message):
        bad_call(torch.ops.ign_fast.ign_loss, inputs)


@requires_ext
def test_backward_kernel_checks_gradient_shapes():
    t = [u.detach() for u in make_inputs((3, 5))]
    out = torch.ops.ign_fast.ign_loss(*t, "l1", 1.0, 1.0, 1.0, 1.5)
    with pytest.raises(RuntimeError, match="grad_rec must have shape"):
        torch.ops.ign_fast.ign_loss_backward(torch.ones(()), torch.ones(4), None, None, *t, out[1], out[4], "l1",
                                             1.0, 1.0, 1.0, 1.5, False)
    with pytest.raises(RuntimeError, match="grad_total must be 0-dim"):
        torch.ops.ign_fast.ign_loss_backward(torch.ones(2), None, None, None, *t, out[1], out[4], "l1", 1.0, 1.0,
                                             1.0, 1.5, False)


@requires_ext
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind, ratio", CONFIGS)
def test_opcheck(device, kind, ratio):
    for shape, same in [((3, 5), False), ((2, 3, 4, 4), True)]:
        t = make_inputs(shape, torch.float32, device, same_ffz=same)
        if same:
            t[4] = t[3].detach().requires_grad_()
        args = (*t, kind, 2.0, 3.0, 0.5, ratio)
        opcheck(torch.ops.ign_fast.ign_loss.default, args)
        out = torch.ops.ign_fast.ign_loss(*(u.detach() for u in t), kind, 2.0, 3.0, 0.5, ratio)
        d = [u.detach() for u in t]
        b = shape[0]
        # only total used (no per-sample gradients, x is data), and every output used with x's gradient
        for row_grads, want_x in [((None, None, None), False), (tuple(torch.randn(b, device=device) for _ in range(3)),
                                                                True)]:
            opcheck(torch.ops.ign_fast.ign_loss_backward.default,
                    (torch.tensor(1.5, device=device), *row_grads, *d, out[1], out[4], kind, 2.0, 3.0, 0.5, ratio,
                     want_x))


@requires_ext
def test_torch_compile_traces_the_op():
    inputs = make_inputs((4, 10))
    compiled = torch.compile(lambda *t: ops.ign_loss(*t)[0], backend="aot_eager", fullgraph=True)
    total = compiled(*inputs)
    grads = torch.autograd.grad(total, inputs)
    ref_total = reference.ign_loss(*inputs)[0]
    ref_grads = torch.autograd.grad(ref_total, inputs)
    torch.testing.assert_close(total, ref_total)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_pure_torch_fallback_when_extension_disabled():
    code = ("import ign_fast, torch; from ign_fast.objectives import IGNLoss; i = ign_fast.build_info(); "
            "assert not i['extension_loaded'], i; a = torch.zeros(2, 3); "
            "print(float(IGNLoss(tight_clamp_ratio=None)(a, a + 1, a, a + 2, a + 2)[0]))")
    env = {"IGN_FAST_DISABLE_EXTENSION": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) == pytest.approx(20.0 * 1 + 20.0 * 2 - 2.5 * 2)
