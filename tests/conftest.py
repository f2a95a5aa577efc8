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


class SkipMLP(torch.nn.Module):
    """A user-written model with a skip connection: f(x) = x + 0.5·mlp(x)."""

    def __init__(self, dim=6):
        super().__init__()
        from ign_fast.models import MLP

        self.body = MLP(dim, hidden=16, depth=2)

    def forward(self, x):
        return x + 0.5 * self.body(x)
