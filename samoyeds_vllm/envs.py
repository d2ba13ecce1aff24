"""Environment variables read by samoyeds-vllm (each defined once, here)."""

from __future__ import annotations

import os
import shlex

__all__ = ["build_dir", "cuda_kernels_disabled", "extra_nvcc_flags", "verbose_build"]

# Read by the CUDA launcher itself (csrc/moe_dual_sparse.cu), once per process, for tuning runs:
#   SAMOYEDS_TOKEN_TILE=8|16|32|64  force the token tile BN instead of the tokens-per-expert rule
#                                   (1:2:V+2:4 caps it at 32; a forced tile also turns the wgmma path off)
#   SAMOYEDS_WGMMA=0|1|2            Hopper wgmma.sp kernels (capability 9.0, 2:4 and 1:2:V+2:4): 1 (default) when
#                                   an expert gets >= 16 tokens on average (1:2:V+2:4 with V < 128: >= 64),
#                                   0 never, 2 for every call (tests)
#   SAMOYEDS_WG_EXPAND=0|1|2        1:2:V+2:4 on the wgmma.sp kernels with its row pairs expanded in registers
#                                   instead of two accumulator banks: 1 (default) for V = 32, 0 never, 2 for every
#                                   1:2:V+2:4 call on the wgmma.sp path (tests)
#   SAMOYEDS_WG_TOKEN_TILE=32|48|64 force the token tile of the wgmma.sp kernels (2:4, and 1:2:V+2:4 with
#                                   accumulator banks; default: by the tokens per expert)
#   SAMOYEDS_WG_RASTER_KB=N         L2 share (KiB) for the token rows of one raster block of wgmma.sp work items
#                                   (default: a third of the device's L2; 0 = all tiles in one block)


def cuda_kernels_disabled() -> bool:
    """``SAMOYEDS_DISABLE_CUDA_KERNELS=1``: never build or load the CUDA kernels; GPUs run the exact reference."""
    return os.environ.get("SAMOYEDS_DISABLE_CUDA_KERNELS", "0") == "1"


def build_dir() -> str | None:
    """``SAMOYEDS_BUILD_DIR``: where the JIT build of csrc/ is cached (default: torch's extension cache)."""
    return os.environ.get("SAMOYEDS_BUILD_DIR") or None


def verbose_build() -> bool:
    """``SAMOYEDS_VERBOSE_BUILD=1``: print the compiler command lines of the JIT build."""
    return os.environ.get("SAMOYEDS_VERBOSE_BUILD", "0") == "1"


def extra_nvcc_flags() -> list[str]:
    """``SAMOYEDS_EXTRA_NVCC_FLAGS``: extra nvcc flags for the JIT build (tuning sweeps, e.g. pipeline shapes
    ``-DSAMOYEDS_PIPE_SAMOYEDS=424``, see csrc/moe_dual_sparse.cu); use with its own SAMOYEDS_BUILD_DIR."""
    return shlex.split(os.environ.get("SAMOYEDS_EXTRA_NVCC_FLAGS", ""))
