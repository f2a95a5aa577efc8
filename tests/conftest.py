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


def devices():
    return ["cpu"] + (["cuda"] if CUDA else [])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


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
