"""Builds ign_fast and its compiled extension ign_fast._C.

The C++ CPU kernels are always built. The CUDA kernels are built when IGN_FAST_CUDA says so:
  IGN_FAST_CUDA=auto (default)  build them when torch has CUDA and a CUDA toolkit is found
  IGN_FAST_CUDA=1               build them or fail loudly
  IGN_FAST_CUDA=0               never
No GPU is needed to compile. Install with `pip install --no-build-isolation .`: torch must already be
importable, and the extension must be built against the torch that will import it (see README).
"""
import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # torch is deliberately not a build requirement: building against another torch breaks _C
    sys.exit("ign_fast: install torch first, then `pip install --no-build-isolation .` (torch must be importable)")

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_wanted():
    mode = os.environ.get("IGN_FAST_CUDA", "auto").strip().lower()
    if mode not in ("0", "1", "auto"):
        sys.exit(f"ign_fast: IGN_FAST_CUDA must be 0, 1 or auto, got {mode!r}")
    if mode == "0":
        return False
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is a CPU build")
    if cpp_extension.CUDA_HOME is None:
        reasons.append("no CUDA toolkit found (set CUDA_HOME)")
    if reasons:
        if mode == "1":
            sys.exit("ign_fast: IGN_FAST_CUDA=1 but CUDA cannot be built: " + "; ".join(reasons))
        print("ign_fast: building CPU kernels only (" + "; ".join(reasons) + ")")
        return False
    return True


def _cuda_include_dirs():
    # Pip's CUDA wheels carry headers that a bare toolkit may lack (cusparse.h, needed by ATen's CUDA context).
    dirs = []
    for site in sys.path:
        dirs += glob.glob(os.path.join(site, "nvidia", "cu*", "include"))
        dirs += glob.glob(os.path.join(site, "nvidia", "*", "include"))
    return sorted(set(d for d in dirs if os.path.isdir(d)))


def _extension():
    with_cuda = _cuda_wanted()
    sources = [os.path.join("csrc", "ops.cpp")] + sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    define_macros = [("IGN_FAST_TORCH_VERSION", f'"{torch.__version__}"')]
    cxx_flags = ["-O3", "-fopenmp"]  # the C++ standard is torch's choice (2.14 needs C++20)
    extra = {"cxx": cxx_flags}
    include_dirs = [os.path.join(HERE, "csrc")]
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # Without a GPU torch would target every architecture; Hopper (H100/H200) is what we run on.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        define_macros += [("IGN_FAST_WITH_CUDA", None), ("IGN_FAST_CUDA_VERSION", f'"{torch.version.cuda}"')]
        extra["nvcc"] = ["-O3", "-lineinfo"]
        include_dirs += _cuda_include_dirs()
        return cpp_extension.CUDAExtension(
            "ign_fast._C", sources, define_macros=define_macros, extra_compile_args=extra,
            include_dirs=include_dirs, extra_link_args=["-fopenmp"])
    return cpp_extension.CppExtension(
        "ign_fast._C", sources, define_macros=define_macros, extra_compile_args=extra,
        include_dirs=include_dirs, extra_link_args=["-fopenmp"])


setup(
    packages=["ign_fast", "ign_fast.kernels"],
    package_dir={"ign_fast": "ign_fast", "ign_fast.kernels": "kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
