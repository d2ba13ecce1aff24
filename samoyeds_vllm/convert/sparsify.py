"""Dense state dict -> sparse samoyeds state dict (pure library code; ``samoyeds-convert`` orchestrates).

Routed-expert weights are pruned with ``pruning.select_mask(pruning.magnitude_scores(w), pattern)`` and packed with
``formats.pack``; every other tensor (attention, norms, routers, embeddings, shared experts) is copied unchanged.
Output keys are per-expert, in the on-disk names of the architecture (see ``architectures``)::

    model.layers.0.mlp.experts.3.gate_proj.weight [I, H]  ->  model.layers.0.mlp.experts.3.gate_proj.sp_values
                                                              model.layers.0.mlp.experts.3.gate_proj.sp_meta
                                                              model.layers.0.mlp.experts.3.gate_proj.sp_rowsel

Fused input (``...mlp.experts.gate_up_proj [E, 2I, H]``, ``...mlp.experts.down_proj [E, H, I]``) is split into the
same per-expert keys.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..formats import FORMAT_VERSION, SparsityPattern, pack, parse_pattern
from ..pruning import magnitude_scores, select_mask
from .architectures import ExpertLayout, get_layout, parse_expert_key, parse_fused_key

__all__ = [
    "QUANT_METHOD",
    "SparsifyResult",
    "build_quantization_config",
    "canonical_key",
    "check_expert_shapes",
    "iter_sparse_tensors",
    "sparsify_state_dict",
    "split_expert_tensors",
]

logger = logging.getLogger(__name__)

#: ``quantization_config.quant_method`` of samoyeds checkpoints.
QUANT_METHOD = "samoyeds"


def build_quantization_config(
    pattern: str | SparsityPattern,
    *,
    ignore: Sequence[str] = (),
    pruning: Mapping[str, object] | None = None,
    targets: Sequence[str] = ("experts",),
) -> dict[str, object]:
    """The ``quantization_config`` block of a samoyeds ``config.json``.

    Parameters
    ----------
    pattern:
        ``"2:4"`` or ``"1:2:V+2:4"``.
    ignore:
        Key prefixes of routed experts that were kept dense.
    pruning:
        Provenance (method and its settings); ``{"method": "magnitude"}`` when omitted.
    targets:
        Which MoE weights are packed: ``"experts"`` (routed) and optionally ``"shared_experts"``.
    """
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "pattern": str(parse_pattern(pattern)),
        "targets": list(targets),
        "ignore": list(ignore),
        "pruning": dict(pruning) if pruning is not None else {"method": "magnitude"},
    }


@dataclass
class SparsifyResult:
    """Output of ``sparsify_state_dict``.

    Attributes
    ----------
    tensors:
        The sparse state dict (per-expert packed tensors plus every copied tensor), on-disk key names.
    masks:
        Per-expert dense key (``...experts.{e}.{proj}.weight``, on-disk names) -> bool mask ``[O, I]``; apply them
        to the dense weights to build the reference "dense model with the same masks".
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)


def canonical_key(key: str, layout: ExpertLayout) -> str:
    """Map Transformers' in-memory module name ``mlp`` back to the on-disk MoE module name (Mixtral)."""
    if layout.moe_module == "mlp":
        return key
    return re.sub(r"\.mlp\.", f".{layout.moe_module}.", key, count=1)


def _is_ignored(key: str, ignore: Sequence[str]) -> bool:
    return any(key.startswith(prefix) for prefix in ignore)


def split_expert_tensors(
    key: str, tensor: torch.Tensor, layout: ExpertLayout
) -> list[tuple[str, str, int, str, torch.Tensor]] | None:
    """Routed-expert weights in ``key`` as ``(dense_key, layer_prefix, expert, proj, weight[O, I])``; None if none.

    ``dense_key`` is the per-expert on-disk key (``...{moe}.experts.{e}.{proj}.weight``), also for fused input
    (``...mlp.experts.gate_up_proj [E, 2I, H]`` yields 2E views, ``down_proj [E, H, I]`` E views). Works on meta
    tensors, so a plan can be made from shapes alone.

    Raises
    ------
    ValueError
        If an expert tensor has the wrong rank or an odd fused ``gate_up_proj``.
    """
    parsed = parse_expert_key(key, layout)
    if parsed is not None:
        if tensor.dim() != 2:
            raise ValueError(f"{key}: expected a 2-D expert weight [O, I], got shape {tuple(tensor.shape)}")
        dense_key = f"{parsed.layer_prefix}.{layout.moe_module}.experts.{parsed.expert}.{parsed.proj}.weight"
        return [(dense_key, parsed.layer_prefix, parsed.expert, parsed.proj, tensor)]
    fused = parse_fused_key(key)
    if fused is None:
        return None
    if tensor.dim() != 3:
        raise ValueError(f"{key}: expected a fused 3-D expert tensor [E, O, I], got shape {tuple(tensor.shape)}")
    if fused.name == "gate_up_proj":
        if tensor.shape[1] % 2:
            raise ValueError(f"{key}: gate_up_proj rows {tensor.shape[1]} must be 2*I (gate rows, then up rows)")
        half = tensor.shape[1] // 2
        parts = [(layout.gate, slice(0, half)), (layout.up, slice(half, 2 * half))]
    else:
        parts = [(layout.down, slice(None))]
    out = []
    for expert in range(tensor.shape[0]):
        for proj, rows in parts:
            dense_key = f"{fused.layer_prefix}.{layout.moe_module}.experts.{expert}.{proj}.weight"
            out.append((dense_key, fused.layer_prefix, expert, proj, tensor[expert, rows]))
    return out


def check_expert_shapes(
    shapes: Mapping[str, Sequence[int]], model_type: str, pattern: str | SparsityPattern, ignore: Sequence[str] = ()
) -> int:
    """Validate every routed-expert shape against the pattern before anything is written.

    Parameters
    ----------
    shapes:
        Dense key -> shape (e.g. read from safetensors headers, no data needed).
    model_type, pattern, ignore:
        As for ``sparsify_state_dict``.

    Returns
    -------
    int
        Number of per-expert weights that will be packed.

    Raises
    ------
    ValueError
        Naming the first key whose shape does not tile by the pattern, or if no routed expert is found.
    """
    layout = get_layout(model_type)
    pattern = parse_pattern(pattern)
    count = 0
    for key, shape in shapes.items():
        if _is_ignored(key, ignore):
            continue
        meta = torch.empty(tuple(shape), device="meta")
        parts = split_expert_tensors(key, meta, layout)
        for dense_key, *_, weight in parts or ():
            pattern.check_shape(weight.shape[0], weight.shape[1], name=dense_key)
            count += 1
    if count == 0:
        raise ValueError(
            f"no routed-expert weights found for model_type {model_type!r}: expected keys like "
            f"'model.layers.0.{layout.moe_module}.experts.0.{layout.gate}.weight' or "
            "'model.layers.0.mlp.experts.gate_up_proj'"
        )
    return count


def iter_sparse_tensors(
    items: Iterable[tuple[str, torch.Tensor]],
    model_type: str,
    pattern: str | SparsityPattern,
    ignore: Sequence[str] = (),
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor | None, str | None]]:
    """Stream a dense checkpoint into sparse tensors, one input tensor at a time.

    Parameters
    ----------
    items:
        ``(key, tensor)`` pairs, per-expert or fused layout.
    model_type:
        Hugging Face ``model_type`` (see ``architectures.SUPPORTED_MODEL_TYPES``).
    pattern:
        ``"2:4"`` or ``"1:2:V+2:4"``.
    ignore:
        Key prefixes whose routed experts stay dense (copied).

    Yields
    ------
    tuple
        ``(out_key, tensor, mask, dense_key)``: for packed tensors the mask ``[O, I]`` bool and the per-expert
        dense key are given on the ``sp_values`` entry only; both are None otherwise.

    Raises
    ------
    ValueError
        For an unsupported ``model_type`` or an expert shape that does not tile by the pattern (naming the key).
    """
    layout = get_layout(model_type)
    pattern = parse_pattern(pattern)
    for key, tensor in items:
        parts = None if _is_ignored(key, ignore) else split_expert_tensors(key, tensor, layout)
        if parts is None:
            yield canonical_key(key, layout), tensor, None, None
            continue
        for dense_key, layer_prefix, expert, proj, weight in parts:
            pattern.check_shape(weight.shape[0], weight.shape[1], name=dense_key)
            mask = select_mask(magnitude_scores(weight), pattern)
            packed = pack(weight.contiguous(), mask, pattern)
            for suffix, packed_tensor in packed.tensors().items():
                out_key = layout.expert_key(layer_prefix, expert, proj, suffix)
                first = suffix == "sp_values"
                yield out_key, packed_tensor, mask if first else None, dense_key if first else None


def sparsify_state_dict(
    state_dict: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    model_type: str,
    pattern: str | SparsityPattern,
    *,
    ignore: Sequence[str] = (),
    keep_masks: bool = True,
) -> SparsifyResult:
    """Prune and pack the routed experts of a dense state dict.

    Parameters
    ----------
    state_dict:
        Dense tensors by key (a mapping or ``(key, tensor)`` pairs), per-expert or fused expert layout.
    model_type:
        Hugging Face ``model_type``.
    pattern:
        ``"2:4"`` or ``"1:2:V+2:4"``.
    ignore:
        Key prefixes whose routed experts stay dense.
    keep_masks:
        Keep each expert weight's mask in ``SparsifyResult.masks``.

    Returns
    -------
    SparsifyResult
        The sparse tensors and (optionally) the masks.

    Raises
    ------
    ValueError
        For an unsupported ``model_type``, a shape not tiling by the pattern, or no routed expert at all.
    """
    items = state_dict.items() if isinstance(state_dict, Mapping) else state_dict
    result = SparsifyResult()
    for out_key, tensor, mask, dense_key in iter_sparse_tensors(items, model_type, pattern, ignore):
        if out_key in result.tensors:
            raise ValueError(f"{out_key}: produced twice (both fused and per-expert expert keys in the input?)")
        result.tensors[out_key] = tensor
        if keep_masks and mask is not None:
            result.masks[dense_key] = mask
    packed_count = sum(key.endswith(".sp_values") for key in result.tensors)
    if packed_count == 0:
        layout = get_layout(model_type)
        raise ValueError(
            f"no routed-expert weights found for model_type {model_type!r}: expected keys like "
            f"'model.layers.0.{layout.moe_module}.experts.0.{layout.gate}.weight' or "
            "'model.layers.0.mlp.experts.gate_up_proj'"
        )
    logger.info("sparsified %d expert weights to pattern %s", packed_count, parse_pattern(pattern))
    return result
