"""ign_fast: fast Idempotent Generative Networks (Shocher et al., ICLR 2024) and NAIGN for PyTorch."""
from ._extension import build_info
from .ops import get_backend, ign_loss, ign_loss_with_grad, per_sample_distance, set_backend

__version__ = "0.1.0"

__all__ = ["build_info", "ign_loss", "ign_loss_with_grad", "per_sample_distance", "set_backend", "get_backend", "__version__"]
