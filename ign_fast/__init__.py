"""ign_fast: fast Idempotent Generative Networks (Shocher et al., ICLR 2024) and NAIGN for PyTorch."""
from ._extension import build_info
from .ops import get_backend, nearest_neighbors, per_sample_distance, set_backend

__version__ = "0.1.0"

__all__ = ["build_info", "per_sample_distance", "nearest_neighbors", "set_backend", "get_backend", "__version__"]
