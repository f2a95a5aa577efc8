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
