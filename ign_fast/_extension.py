"""Loads the compiled extension ign_fast._C, or explains once why the pure-PyTorch path is used instead."""
import os
import warnings

import torch

_C = None
LOAD_ERROR = None

if os.environ.get("IGN_FAST_DISABLE_EXTENSION", "") not in ("", "0"):
    LOAD_ERROR = "disabled by IGN_FAST_DISABLE_EXTENSION"
else:
    try:
        from . import _C  # noqa: F811  (registers torch.ops.ign_fast.* as a side effect)

        if _C.torch_version != torch.__version__:
            # The op library may still have loaded, but a build for another torch can misbehave: don't use it.
            LOAD_ERROR = f"built against torch {_C.torch_version}, running torch {torch.__version__}; rebuild it"
            _C = None
    except (ImportError, OSError) as error:  # missing, or an ABI mismatch (undefined symbol)
        LOAD_ERROR = str(error).splitlines()[0] if str(error) else type(error).__name__
        _C = None

if LOAD_ERROR is not None and LOAD_ERROR != "disabled by IGN_FAST_DISABLE_EXTENSION":
    warnings.warn(f"ign_fast: compiled extension unavailable ({LOAD_ERROR}); using the pure-PyTorch path",
                  RuntimeWarning, stacklevel=3)

HAS_C = _C is not None
CUDA_BUILT = bool(HAS_C and _C.cuda_built())


def build_info():
    """Build facts: whether the extension loaded, whether its CUDA kernels were compiled, and the versions."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "extension_loaded": HAS_C,
        "extension_error": LOAD_ERROR,
        "cuda_built": CUDA_BUILT,
        "torch_built_against": _C.torch_version if HAS_C else None,
        "torch_running": torch.__version__,
        "cuda_built_against": _C.cuda_version if HAS_C else None,
        "triton": triton_version,
    }
