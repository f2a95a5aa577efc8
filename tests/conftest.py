import os

import pytest
import torch

# Without a GPU the Triton kernels run only in triton's interpreter, which reads TRITON_INTERPRET when a
# kernel is defined: set it before any test imports ign_fast.kernels. It changes nothing else (CPU
# torch.compile emits C++, and ign_fast picks Triton only when asked: set_backend("triton")).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests are small: two threads is this machine's size, and keeps runs repeatable.
torch.set_num_threads(min(2, os.cpu_count() or 1))

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

# The kernel tests (modules marked `pytestmark = pytest.mark.kernels`) compare the compiled kernels with
# ign_fast.reference. Where the extension did not load, every op runs the reference, and those tests would
# compare the reference with itself and pass: they fail instead (_kernels_built below). Only
# IGN_FAST_DISABLE_EXTENSION (read as ign_fast._extension reads it) turns the extension off on purpose; then
# the kernel tests run the reference path and the tests that need the compiled ops skip.
EXTENSION_OFF_ON_PURPOSE = os.environ.get("IGN_FAST_DISABLE_EXTENSION", "") not in ("", "0")
requires_ext = pytest.mark.skipif(
    EXTENSION_OFF_ON_PURPOSE, reason="IGN_FAST_DISABLE_EXTENSION is set: the compiled extension is off on purpose")


def kernels_missing():
    """Why the compiled kernels the kernel tests exist for are missing here, or None."""
    import ign_fast

    info = ign_fast.build_info()
    if EXTENSION_OFF_ON_PURPOSE:
        return None
    if not info["extension_loaded"]:
        return (f"ign_fast's compiled extension did not load ({info['extension_error']}): the kernel tests would "
                "compare the reference with itself. Build it (make setup, or pip install --no-build-isolation "
                "-e .), or set IGN_FAST_DISABLE_EXTENSION=1 to test the pure-PyTorch path on purpose.")
    if CUDA and not info["cuda_built"]:
        return ("a CUDA GPU is present but ign_fast was built without its CUDA kernels: the CUDA tests would "
                "run the reference. Rebuild with the CUDA toolkit (CUDA_HOME set; IGN_FAST_CUDA=1 forces it).")
    return None


@pytest.fixture(autouse=True)
def _kernels_built(request):
    if request.node.get_closest_marker("kernels") is not None:
        problem = kernels_missing()
        if problem is not None:
            pytest.fail(problem, pytrace=False)


def assert_native(t):
    """The ops run a compiled kernel for tensors like t, so the comparison with the reference is a test of
    that kernel (the reference path when the extension is off on purpose)."""
    from ign_fast import ops

    expected = "torch" if EXTENSION_OFF_ON_PURPOSE else "native"
    assert ops.kernel_path(t) == expected, (f"ops.kernel_path({t.device}) is {ops.kernel_path(t)!r}, "
                                            f"expected {expected!r} (backend {ops.get_backend()!r})")


def devices():
    return ["cpu"] + (["cuda"] if CUDA else [])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _gpu_kernels_on():
    """On a GPU the tests exist to check the CUDA kernels, which "auto" leaves off until they have passed
    there (ops.GPU_KERNELS_VERIFIED): every test runs with backend "native" unless it picks its own."""
    if not CUDA:
        yield
        return
    from ign_fast import ops

    before = ops.get_backend()
    ops.set_backend("native")
    yield
    ops.set_backend(before)


@pytest.fixture(scope="module")
def one_thread():
    # For modules of small tensors: on a shared 2-core machine a second OpenMP thread mostly spin-waits for
    # the first (several-fold slower under load), so such a module runs single-threaded.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_tf32():
    """float32 matmuls and convolutions in full precision (the GPU tolerances assume it), restored after."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.fixture
def capturable_on_cpu(monkeypatch):
    """Let Adam run with capturable=True on CPU tensors (torch allows it only on accelerators; the math is
    the same tensor code), so the update a CUDA graph captures, optimizer step included, runs here whole."""
    import torch.optim.adam as adam

    supported = adam._get_capturable_supported_devices
    monkeypatch.setattr(adam, "_get_capturable_supported_devices", lambda *a, **k: [*supported(*a, **k), "cpu"])


class SkipMLP(torch.nn.Module):
    """A user-written model with a skip connection: f(x) = x + 0.5·mlp(x)."""

    def __init__(self, dim=6):
        super().__init__()
        from ign_fast.models import MLP

        self.body = MLP(dim, hidden=16, depth=2)

    def forward(self, x):
        return x + 0.5 * self.body(x)
