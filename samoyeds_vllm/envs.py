"""Environment variables read by samoyeds-vllm (each defined once, here)."""

from __future__ import annotations

import os

__all__ = ["build_dir", "cuda_kernels_disabled", "verbose_build"]


def cuda_kernels_disabled() -> bool:
    """``SAMOYEDS_DISABLE_CUDA_KERNELS=1``: never build or load the CUDA kernels; GPUs run the exact reference."""
    return os.environ.get("SAMOYEDS_DISABLE_CUDA_KERNELS", "0") == "1"


def build_dir() -> str | None:
    """``SAMOYEDS_BUILD_DIR``: where the JIT build of csrc/ is cached (default: torch's extension cache)."""
    return os.environ.get("SAMOYEDS_BUILD_DIR") or None


def verbose_build() -> bool:
    """``SAMOYEDS_VERBOSE_BUILD=1``: print the compiler command lines of the JIT build."""
    return os.environ.get("SAMOYEDS_VERBOSE_BUILD", "0") == "1"
