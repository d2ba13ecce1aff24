"""Build (JIT, cached) and load the CUDA kernels of csrc/, which register ``samoyeds::*`` CUDA implementations.

The build targets the capability of the current GPU only, so a clean checkout compiles in about a minute.
Loading is attempted once per process; failure is logged once and the exact reference keeps serving GPUs.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

from .. import envs

__all__ = ["CSRC_DIR", "cuda_kernels_available", "load_cuda_kernels"]

logger = logging.getLogger(__name__)

#: csrc/ of a source checkout, or the copy shipped inside the wheel.
CSRC_DIR = next(
    (
        p
        for p in (Path(__file__).resolve().parents[2] / "csrc", Path(__file__).resolve().parents[1] / "csrc")
        if p.is_dir()
    ),
    Path(__file__).resolve().parents[2] / "csrc",
)
_SOURCES = ("moe_dual_sparse.cu",)


@functools.cache
def load_cuda_kernels() -> bool:
    """Build and load the kernels for the current device; True when ``samoyeds::*`` has CUDA kernels."""
    if envs.cuda_kernels_disabled():
        logger.warning("SAMOYEDS_DISABLE_CUDA_KERNELS=1: GPUs run the exact (slow) torch reference")
        return False
    if not torch.cuda.is_available():
        return False
    from torch.utils import cpp_extension

    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        logger.warning("samoyeds kernels need sm_80 or newer (found sm_%d%d): using the torch reference", major, minor)
        return False
    arch = f"{major}{minor}a" if major >= 9 else f"{major}{minor}"
    flags = ["-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}", "--use_fast_math", "-lineinfo"]
    flags += envs.extra_nvcc_flags()
    build_directory = envs.build_dir()
    try:
        if build_directory is not None:  # torch's loader expects the directory to exist
            os.makedirs(build_directory, exist_ok=True)
        cpp_extension.load(
            name=f"samoyeds_cuda_sm{arch}",
            sources=[str(CSRC_DIR / s) for s in _SOURCES],
            extra_cuda_cflags=flags,
            extra_cflags=["-O3"],
            build_directory=build_directory,
            is_python_module=False,
            verbose=envs.verbose_build(),
        )
    except (RuntimeError, OSError, ImportError) as err:
        logger.warning("samoyeds CUDA kernels failed to build or load (%s); GPUs run the exact torch reference", err)
        return False
    logger.info("samoyeds: CUDA kernels loaded for sm_%s (mma.sp grouped MoE)", arch)
    return True


def cuda_kernels_available() -> bool:
    """True when the CUDA kernels are loaded (building them on first call)."""
    return load_cuda_kernels()
