"""vLLM plugin: serve samoyeds sparse-expert checkpoints with ``vllm serve <dir>``.

vLLM calls :func:`register` in every process through the entry point
``vllm.general_plugins: samoyeds = samoyeds_vllm.vllm_plugin:register``. Importing this package does nothing
else, so a missing optional dependency cannot break vLLM start-up for users who do not serve our models.
"""

from __future__ import annotations

import logging

__all__ = ["register"]

logger = logging.getLogger(__name__)

_registered = False


def register() -> None:
    """Register the ``samoyeds`` quantization config and the ``samoyeds::`` ops with vLLM.

    Safe to call more than once (later calls return at once). vLLM only logs a plugin whose import fails, so
    any failure here is raised, not logged: serving a samoyeds checkpoint without the plugin would fail later
    with a far less clear message.

    Raises
    ------
    RuntimeError
        If the config or the ops cannot be registered (the cause is chained).
    """
    global _registered
    if _registered:
        return
    try:
        from .. import ops  # noqa: F401  (registers torch.ops.samoyeds)
        from . import config  # noqa: F401  (registers quant_method "samoyeds")
    except Exception as exc:
        raise RuntimeError(
            f"samoyeds-vllm: registering the vLLM plugin failed ({type(exc).__name__}: {exc}). "
            "Check that a supported vLLM (0.26-0.33) and samoyeds-vllm are installed in the same environment"
        ) from exc
    _registered = True
    logger.debug("samoyeds-vllm: vLLM plugin registered")
