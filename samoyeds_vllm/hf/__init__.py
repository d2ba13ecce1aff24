"""Hugging Face Transformers integration: the ``samoyeds`` quantization config and ``HfQuantizer``.

``import samoyeds_vllm`` calls ``install_import_hook()``: registration with Transformers happens the moment
``transformers.quantizers.auto`` is imported (at once if it already is), so importing our package stays cheap and
Transformers is never imported on our account. Without ``import samoyeds_vllm`` before ``from_pretrained``,
Transformers does not know ``quant_method: samoyeds``, only warns, and builds a model with uninitialised experts.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys
from typing import Any

__all__ = ["SamoyedsConfig", "SamoyedsExperts", "SamoyedsHfQuantizer", "install_import_hook", "register"]

logger = logging.getLogger(__name__)

_AUTO_MODULE = "transformers.quantizers.auto"
_registered = False


def register() -> bool:
    """Register ``SamoyedsConfig`` and ``SamoyedsHfQuantizer`` under ``"samoyeds"`` with Transformers.

    Safe to call any number of times. Imports Transformers.

    Returns
    -------
    bool
        True once registered; False if Transformers is not installed.

    Raises
    ------
    ValueError
        If another package already registered a different ``"samoyeds"`` config or quantizer.
    """
    global _registered
    if _registered:
        return True
    if importlib.util.find_spec("transformers") is None:
        return False
    quantizer = sys.modules.get(f"{__name__}.quantizer")
    if quantizer is not None and not hasattr(quantizer, "SamoyedsHfQuantizer"):
        # Our quantizer module is mid-import (it imports Transformers, which fired the hook); it calls register()
        # itself once its classes exist.
        return False
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )

    from .quantizer import QUANT_METHOD, SamoyedsConfig, SamoyedsHfQuantizer

    for mapping, cls, add in (
        (AUTO_QUANTIZATION_CONFIG_MAPPING, SamoyedsConfig, register_quantization_config),
        (AUTO_QUANTIZER_MAPPING, SamoyedsHfQuantizer, register_quantizer),
    ):
        taken = mapping.get(QUANT_METHOD)
        if taken is None:
            add(QUANT_METHOD)(cls)
        elif f"{taken.__module__}.{taken.__qualname__}" != f"{cls.__module__}.{cls.__qualname__}":
            raise ValueError(
                f"Transformers already has a {QUANT_METHOD!r} quantization entry from {taken.__module__}; "
                "samoyeds-vllm cannot register its own"
            )
    _registered = True
    logger.debug("registered the %r quantization method with Transformers", QUANT_METHOD)
    return True


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Runs ``register()`` right after ``transformers.quantizers.auto`` finishes importing."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != _AUTO_MODULE:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module: Any) -> None:
            exec_module(module)
            _remove_hook()
            # A failure here must not break `import transformers` for everyone else (vLLM imports it too): say it
            # loudly instead; loading a samoyeds checkpoint then fails with Transformers' unknown-method warning.
            try:
                register()
            except (ImportError, AttributeError, ValueError) as err:
                logger.warning("samoyeds-vllm could not register with Transformers (%s): %s", type(err).__name__, err)

        spec.loader.exec_module = exec_then_register
        return spec


_hook: _RegisterAfterImport | None = None


def _remove_hook() -> None:
    global _hook
    if _hook is not None and _hook in sys.meta_path:
        sys.meta_path.remove(_hook)
    _hook = None


def install_import_hook() -> None:
    """Register with Transformers now if ``transformers.quantizers.auto`` is imported, else when it is.

    Cheap and idempotent; does nothing if Transformers is not installed.
    """
    global _hook
    if _registered or _hook is not None:
        return
    if _AUTO_MODULE in sys.modules:
        register()
        return
    if importlib.util.find_spec("transformers") is None:
        return
    _hook = _RegisterAfterImport()
    sys.meta_path.insert(0, _hook)


def __getattr__(name: str) -> Any:
    if name in ("SamoyedsConfig", "SamoyedsHfQuantizer"):
        from . import quantizer

        return getattr(quantizer, name)
    if name == "SamoyedsExperts":
        from .experts import SamoyedsExperts

        return SamoyedsExperts
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
