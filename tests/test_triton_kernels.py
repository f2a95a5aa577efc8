"""The Triton kernels (kernels/ign_loss.py, kernels/per_sample_distance.py) against the reference. Without a
GPU they run under TRITON_INTERPRET=1 (tests/conftest.py sets it), so sizes stay small."""
import pytest
import torch

import ign_fast
from ign_fast import ops, reference

from conftest import devices
from test_ign_loss import CONFIGS, ROLES, loss_and_grads, make_inputs

triton = pytest.importorskip("triton")


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
        floor = (1e-5 if dtype != torch.float64 else 1e-7) * float(e.abs().max())  # _tanh's series near 0
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


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("same_ffz", [False, True])
def test_ign_loss_with_grad(use_triton, device, same_ffz):
    triton_device(device)
    inputs = make_inputs((3, 2, 9), torch.float32, device, same_ffz=same_ffz)
    if same_ffz:
        inputs[4] = inputs[3].detach().requires_grad_()
    values, given = ign_fast.ign_loss_with_grad(*inputs, kind="l2", compute_grad_x=True)
    ref_out, ref_grads = loss_and_grads(reference.ign_loss, inputs, kind="l2")
    for a, b in zip(list(values) + list(given), ref_out + ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
