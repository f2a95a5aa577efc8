import os

import pytest
import torch

# Tests are small: two threads is this machine's size, and keeps runs repeatable.
torch.set_num_threads(min(2, os.cpu_count() or 1))

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def devices():
    return ["cpu"] + (["cuda"] if CUDA else [])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
