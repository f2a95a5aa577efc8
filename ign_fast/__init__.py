"""ign_fast: fast Idempotent Generative Networks (Shocher et al., ICLR 2024) and NAIGN for PyTorch."""
from ._extension import build_info
from .export import export_projector
from .inference import Projector
from .naign import NAIGNLoss, NAIGNStep
from .objectives import IGNLoss
from .ops import get_backend, ign_loss, nearest_neighbors, per_sample_distance, set_backend
from .step import IGNStep

__version__ = "0.1.0"

__all__ = ["IGNLoss", "IGNStep", "NAIGNLoss", "NAIGNStep", "Projector", "build_info", "export_projector",
           "get_backend", "ign_loss", "nearest_neighbors", "per_sample_distance",
           "set_backend", "__version__"]
