"""ign_fast::per_sample_distance against the plain PyTorch reference, through the op registry."""
import os
import subprocess
import sys

import pytest
import torch
from torch.library import opcheck

import ign_fast
from ign_fast import reference

from conftest import assert_native, devices, requires_cuda, requires_ext

pytestmark = pytest.mark.kernels

# (atol, rtol) of the op against the float64 reference, per input dtype
TOLERANCES = {torch.float64: (1e-12, 1e-12), torch.float32: (1e-6, 1e-5), torch.bfloat16: (1e-6, 1e-5)}
SHAPES = [(1, 1), (3, 47), (257, 7), (2, 3, 28, 28), (1, 3, 64, 64), (3, 5, 1, 13)]


def naive_distance(a, b, kind):
    diff = (a.double() - b.double())
    diff = diff.abs() if kind == "l1" else diff ** 2
    return torch.stack([row.mean() for row in diff])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", ["l1", "l2"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_forward_matches_naive(device, kind, shape, dtype):
    a = torch.randn(shape, device=device).to(dtype)
    b = torch.randn(shape, device=device).to(dtype)
    assert_native(a)
    out = ign_fast.per_sample_distance(a, b, kind)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    atol, rtol = TOLERANCES[dtype]
    # the inputs are exact in their dtype, so the only error allowed is the accumulation's
    torch.testing.assert_close(out.double(), naive_distance(a, b, kind), atol=atol, rtol=rtol)


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_gradcheck_float64(kind):
    a = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ign_fast.per_sample_distance(a, b, kind), (a, b))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_backward_matches_reference(device, kind):
    a = torch.randn(5, 3, 9, 11, device=device, requires_grad=True)
    b = torch.randn(5, 3, 9, 11, device=device, requires_grad=True)
    w = torch.randn(5, device=device)
    assert_native(a)
    (ign_fast.per_sample_distance(a, b, kind) * w).sum().backward()
    ga, gb = a.grad, b.grad
    a.grad = b.grad = None
    (reference.per_sample_distance(a, b, kind) * w).sum().backward()
    torch.testing.assert_close(ga, a.grad)
    torch.testing.assert_close(gb, b.grad)


def test_l1_gradient_at_equal_inputs_is_zero():
    a = torch.randn(4, 6, requires_grad=True)
    b = a.detach().clone().requires_grad_(True)
    ign_fast.per_sample_distance(a, b, "l1").sum().backward()
    assert torch.equal(a.grad, torch.zeros_like(a))


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_noncontiguous_and_channels_last(kind):
    base_a = torch.randn(6, 3, 10, 12)
    base_b = torch.randn(6, 3, 10, 12)
    a, b = base_a[::2, :, 1:, ::2], base_b[::2, :, 1:, ::2]       # strided views
    assert not a.is_contiguous()
    torch.testing.assert_close(ign_fast.per_sample_distance(a, b, kind), reference.per_sample_distance(a, b, kind))
    cl_a, cl_b = base_a.to(memory_format=torch.channels_last), base_b.to(memory_format=torch.channels_last)
    torch.testing.assert_close(ign_fast.per_sample_distance(cl_a, cl_b, kind),
                               reference.per_sample_distance(base_a, base_b, kind))
    ta, tb = base_a.transpose(2, 3), base_b.transpose(2, 3)
    torch.testing.assert_close(ign_fast.per_sample_distance(ta, tb, kind), reference.per_sample_distance(ta, tb, kind))


def test_empty_batch_and_1d_input():
    assert ign_fast.per_sample_distance(torch.empty(0, 4), torch.empty(0, 4)).shape == (0,)
    a, b = torch.randn(7), torch.randn(7)
    torch.testing.assert_close(ign_fast.per_sample_distance(a, b, "l2"), (a - b) ** 2)


@pytest.mark.parametrize("bad, message", [
    (lambda: ign_fast.per_sample_distance(torch.randn(2, 3), torch.randn(2, 4)), "b must have the shape of a"),
    (lambda: ign_fast.per_sample_distance(torch.randn(2, 3), torch.randn(2, 3).double()), "dtype"),
    (lambda: ign_fast.per_sample_distance(torch.randn(2, 3), torch.randn(2, 3), "cosine"), "kind must be"),
    (lambda: ign_fast.per_sample_distance(torch.ones(2, 3, dtype=torch.int64), torch.ones(2, 3, dtype=torch.int64)),
     "float"),
    (lambda: ign_fast.per_sample_distance(torch.tensor(1.0), torch.tensor(1.0)), "at least 1 dims"),
    (lambda: ign_fast.per_sample_distance(torch.randn(2, 0), torch.randn(2, 0)), "at least one element"),
    (lambda: ign_fast.per_sample_distance([1.0], torch.randn(1)), "must be a torch.Tensor"),
])
def test_bad_input_is_one_clear_line(bad, message):
    with pytest.raises((ValueError, TypeError), match=message) as info:
        bad()
    assert "\n" not in str(info.value)


@requires_ext
@pytest.mark.parametrize("bad_call, message", [
    (lambda op: op(torch.randn(2, 3), torch.randn(2, 4), "l1"), "b must have the shape of a"),
    (lambda op: op(torch.randn(2, 3), torch.randn(2, 3), "l3"), "kind must be"),
    (lambda op: op(torch.ones(2, 3, dtype=torch.int32), torch.ones(2, 3, dtype=torch.int32), "l1"), "must be float"),
])
def test_kernel_checks_its_inputs(bad_call, message):
    # Callers of torch.ops.ign_fast.* directly bypass the Python checks: the kernels check too.
    with pytest.raises(RuntimeError, match=message):
        bad_call(torch.ops.ign_fast.per_sample_distance)


@requires_ext
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_opcheck(device, kind):
    for shape in [(3, 5), (2, 3, 4, 4), (1, 17)]:
        a = torch.randn(shape, device=device, requires_grad=True)
        b = torch.randn(shape, device=device, requires_grad=True)
        opcheck(torch.ops.ign_fast.per_sample_distance.default, (a, b, kind))
        opcheck(torch.ops.ign_fast.per_sample_distance_backward.default,
                (torch.randn(shape[0], device=device), a.detach(), b.detach(), kind))


@requires_ext
def test_torch_compile_traces_the_op():
    a, b = torch.randn(4, 10, requires_grad=True), torch.randn(4, 10)
    compiled = torch.compile(lambda a, b: ign_fast.per_sample_distance(a, b, "l1").sum(), backend="aot_eager",
                             fullgraph=True)
    out = compiled(a, b)
    out.backward()
    torch.testing.assert_close(out, reference.per_sample_distance(a, b).sum())
    torch.testing.assert_close(a.grad, torch.sign(a - b).detach() / 10)


@requires_cuda
@requires_ext
@pytest.mark.parametrize("kind", ["l1", "l2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_forward_is_bitwise_repeatable_on_long_rows(kind, dtype):
    # Rows longer than one chunk (8,192 elements) are reduced by several blocks. Their partials used to be
    # merged with atomicAdd, in whatever order the blocks finished; now they are added in chunk order.
    # 100,003 elements: 13 chunks, the last one partial. The batch mixes it with one-chunk rows' shapes too.
    for shape in [(3, 100_003), (2, 8192), (2, 8193), (1, 1, 317, 317)]:
        a = torch.randn(shape, device="cuda", dtype=dtype)
        b = torch.randn(shape, device="cuda", dtype=dtype)
        assert_native(a)
        first = torch.ops.ign_fast.per_sample_distance(a, b, kind)
        for _ in range(20):
            assert torch.equal(torch.ops.ign_fast.per_sample_distance(a, b, kind), first), shape
        atol, rtol = TOLERANCES[dtype]
        torch.testing.assert_close(first.double().cpu(), naive_distance(a.cpu(), b.cpu(), kind), atol=atol, rtol=rtol)


BLOCK_EXTENSION = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ign_fast._C":
            raise ImportError("blocked by the test: as if the build had failed")
sys.meta_path.insert(0, _Block())
"""


@pytest.mark.parametrize("disabled", [False, True])
def test_kernel_tests_fail_when_the_extension_did_not_load(tmp_path, disabled):
    """Without the compiled extension every op runs the reference, so a kernel test would compare it with
    itself and pass: conftest fails the kernel tests instead, unless IGN_FAST_DISABLE_EXTENSION says so."""
    (tmp_path / "sitecustomize.py").write_text(BLOCK_EXTENSION)  # imported at start-up: ign_fast._C fails
    env = {k: v for k, v in os.environ.items() if k != "IGN_FAST_DISABLE_EXTENSION"}
    env["PYTHONPATH"] = str(tmp_path)
    if disabled:
        env["IGN_FAST_DISABLE_EXTENSION"] = "1"
    tests = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore",
                          f"{tests}/test_per_sample_distance.py::test_gradcheck_float64",
                          f"{tests}/test_per_sample_distance.py::test_opcheck"],
                         env=env, cwd=tests, capture_output=True, text=True, timeout=300)
    if disabled:  # the reference path on purpose: the comparisons run, the tests of compiled ops skip
        assert out.returncode == 0, out.stdout[-3000:]
        assert "2 passed" in out.stdout and "skipped" in out.stdout, out.stdout[-3000:]
    else:
        assert out.returncode != 0, out.stdout[-3000:]
        assert "compiled extension did not load (blocked by the test" in out.stdout, out.stdout[-3000:]
        assert "passed" not in out.stdout, out.stdout[-3000:]


def test_pure_torch_fallback_when_extension_disabled():
    code = ("import ign_fast, torch; i = ign_fast.build_info(); assert not i['extension_loaded'], i; "
            "a = torch.randn(3, 4); print(float(ign_fast.per_sample_distance(a, a + 1, 'l1').sum()))")
    env = {"IGN_FAST_DISABLE_EXTENSION": "1", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) == pytest.approx(3.0)


def test_build_info_reports_facts():
    info = ign_fast.build_info()
    assert info["torch_running"] == torch.__version__
    if info["extension_loaded"]:
        assert info["torch_built_against"] == torch.__version__
        assert isinstance(info["cuda_built"], bool)
