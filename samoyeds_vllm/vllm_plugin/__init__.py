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
    _share_vllm_log_handlers()
    logger.debug("samoyeds-vllm: vLLM plugin registered")


def _share_vllm_log_handlers() -> None:
    """Show our log lines (kernel choice, fallbacks) in vLLM's log, with vLLM's handlers and level.

    vLLM configures handlers on its own ``vllm`` logger only, so records of ``samoyeds_vllm.*`` would reach
    no handler and INFO lines (e.g. which kernel a layer runs) would be lost inside vLLM processes. Loggers
    the user configured (any handler present) are left alone.
    """
    ours, theirs = logging.getLogger("samoyeds_vllm"), logging.getLogger("vllm")
    if ours.handlers or not theirs.handlers:
        return
    for handler in theirs.handlers:
        ours.addHandler(handler)
    ours.setLevel(theirs.level)
    ours.propagate = False
