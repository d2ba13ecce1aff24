"""``SamoyedsMoEMethod``: vLLM fused-MoE layers on packed sparse experts.

Life of one fused-MoE layer (``RoutedExperts``) in vLLM:

1. ``create_weights`` registers the stacked packed tensors of this rank's experts, per layer::

       w13_sp_values [E_local, 2I/g, H/2]  model dtype     w2_sp_values [E_local, H/g, I/2]
       w13_sp_meta   [E_local, 2I/g, H/8]  uint8           w2_sp_meta   [E_local, H/g, I/8]
       w13_sp_rowsel [E_local, I,    H/V]  uint8           w2_sp_rowsel [E_local, H/2, I/V]   (samoyeds only)

   with I the per-rank intermediate size, g = 2 for ``1:2:V+2:4`` and 1 for ``2:4``. W13 stacks the gate
   (rows ``[0, I)``) over the up projection (rows ``[I, 2I)``).
2. vLLM's expert mapping turns checkpoint keys ``experts.{e}.{w1|w3|w2}.{suffix}`` into those parameters and
   calls :meth:`SamoyedsMoEMethod.load_expert_tensor` per tensor (our ``weight_loader``): global expert ids
   become local slots (experts of other EP ranks are skipped), w13 is cut along O in whole row pairs and w2
   along I in whole chunks (``PackedWeight.slice_out_features`` / ``slice_in_features`` define the rules).
   Every loaded tensor is recorded, because vLLM does not check that quantized parameters were all loaded.
3. ``process_weights_after_loading`` checks that every tensor of every local expert arrived, validates the
   packed metadata (``formats.validate``; corrupted metadata fails here, naming the checkpoint tensor), and
   hands the stacked tensors to ``ops.prepare_moe_weights``, which reorders them into the CUDA kernel layout
   when that kernel will run (GPU, bf16/fp16, built) and keeps them canonical otherwise. The parameters are
   replaced by its output; ``samoyeds_kernel_layout`` on the layer records which layout they hold.
4. ``apply`` calls ``ops.moe_forward`` (``samoyeds::moe_sparse_prepacked`` or ``samoyeds::moe_sparse``) on the
   router's top-k, with no host syncs (Dynamo / CUDA-graph safe), and returns this rank's partial sum; vLLM
   reduces across ranks and adds shared experts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..formats import SUFFIXES, VALUE_DTYPES, PackedWeight, SparsityPattern, packed_shapes, validate
from ..ops import MoEWeights, moe_forward, prepare_moe_weights
from ._compat import FusedMoEMethodBase, expert_map, global_to_local_expert, load_format

__all__ = ["SamoyedsMoEMethod", "packed_shapes", "slice_packed_tensor"]

logger = logging.getLogger(__name__)

# A valid sp_meta byte: both groups of 4 keep positions (0, 1), nibble 0 | 1 << 2 = 0x4. Used for dummy loads.
_DUMMY_META_BYTE = 0x44

_SHARDS = ("w1", "w3", "w2")

_kernel_logged = False


def slice_packed_tensor(
    pattern: SparsityPattern,
    suffix: str,
    tensor: torch.Tensor,
    n_out: int,
    n_in: int,
    rows: tuple[int, int] | None = None,
    cols: tuple[int, int] | None = None,
) -> torch.Tensor:
    """One canonical tensor of a packed ``[O, I]`` weight, cut to dense rows and/or columns, as a view.

    The checkpoint delivers the tensors of a weight one at a time; this applies ``PackedWeight``'s slicing
    rules (the only definition of them) to one tensor, with zero-stride stand-ins for the other two.

    Parameters
    ----------
    pattern:
        The checkpoint's pattern.
    suffix:
        ``"sp_values"``, ``"sp_meta"`` or ``"sp_rowsel"``.
    tensor:
        ``[..., *shape]`` as ``packed_shapes(pattern, n_out, n_in)[suffix]`` (leading dims allowed).
    n_out, n_in:
        O and I of the dense weight.
    rows, cols:
        Dense ``[start, stop)`` ranges of O (whole row pairs) and I (whole chunks / metadata bytes).

    Raises
    ------
    ValueError
        If a range cuts a row pair or a chunk, or falls outside the weight.
    """
    lead = tuple(tensor.shape[: tensor.dim() - 2])
    parts = {
        s: torch.empty((), dtype=torch.uint8, device=tensor.device).expand(shape)
        for s, shape in packed_shapes(pattern, n_out, n_in, lead).items()
    }
    parts[suffix] = tensor
    packed = PackedWeight(pattern, parts["sp_values"], parts["sp_meta"], parts.get("sp_rowsel"))
    if rows is not None:
        packed = packed.slice_out_features(*rows)
    if cols is not None:
        packed = packed.slice_in_features(*cols)
    return packed.tensors()[suffix]


@dataclass
class _LayerState:
    """Per-layer loading bookkeeping (kept on the layer as ``layer.samoyeds_state``)."""

    name: str
    pattern: SparsityPattern
    num_local_experts: int
    hidden_size: int
    intermediate_local: int
    intermediate_full: int
    tp_rank: int
    ckpt_names: dict[str, str]
    dummy: bool
    loaded: set[tuple[str, str, int]] = field(default_factory=set)

    def key(self, global_expert: int | str, shard_id: str, suffix: str) -> str:
        """The checkpoint key of one tensor, for messages."""
        return f"{self.name}.{global_expert}.{self.ckpt_names[shard_id]}.{suffix}"


def _local_to_global(layer: torch.nn.Module, local: int) -> int:
    table = expert_map(layer)
    if table is None:
        return local
    hits = (table == local).nonzero()
    return int(hits[0, 0]) if hits.numel() else local


class SamoyedsMoEMethod(FusedMoEMethodBase):
    """Fused-MoE method for routed experts stored in a samoyeds packed checkpoint.

    Parameters
    ----------
    quant_config:
        The ``SamoyedsConfig`` (pattern, format version).
    moe:
        vLLM's ``FusedMoEConfig`` of the layer (activation, TP rank and size).
    """

    def __init__(self, quant_config, moe) -> None:
        super().__init__(moe)
        self.quant_config = quant_config
        self.pattern: SparsityPattern = quant_config.pattern

    # --- weights ---------------------------------------------------------------------------------------

    def maybe_roundup_sizes(self, hidden_size, intermediate_size_per_partition, act_dtype, moe_parallel_config):
        """Keep sizes as they are: packed tensors cannot be padded (rounding would misalign the metadata)."""
        return hidden_size, intermediate_size_per_partition

    def create_weights(
        self,
        layer: torch.nn.Module,
        num_experts: int,
        hidden_size: int,
        intermediate_size_per_partition: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        """Register this rank's stacked packed expert tensors on ``layer`` (see the module docstring).

        Raises
        ------
        ValueError
            For a non-SwiGLU activation, an unsupported dtype, or sizes that do not tile by the pattern
            after tensor-parallel splitting.
        """
        name = getattr(layer, "layer_name", "experts")
        activation = getattr(getattr(self.moe, "activation", None), "value", getattr(self.moe, "activation", None))
        if str(activation).lower() != "silu" or not getattr(self.moe, "is_act_and_mul", True):
            raise ValueError(
                f"{name}: samoyeds sparse experts implement SwiGLU (silu(gate) * up) only; this layer uses "
                f"activation {activation!r}"
            )
        if getattr(layer, "apply_router_weight_on_input", False):
            raise ValueError(f"{name}: samoyeds sparse experts do not support apply_router_weight_on_input")
        if params_dtype not in VALUE_DTYPES:
            raise ValueError(f"{name}: dtype {params_dtype} not supported; use bfloat16, float16 or float32")
        tp_size = int(getattr(self.moe, "tp_size", 1))
        tp_rank = int(getattr(self.moe, "tp_rank", 0))
        inter, hidden, pattern = intermediate_size_per_partition, hidden_size, self.pattern
        try:
            w13_shapes = packed_shapes(pattern, 2 * inter, hidden, (num_experts,))
            packed_shapes(pattern, inter, hidden)  # each of gate and up must be whole row pairs
            w2_shapes = packed_shapes(pattern, hidden, inter, (num_experts,))
        except ValueError as exc:
            raise ValueError(
                f"{name}: hidden size H={hidden}, intermediate size per rank I={inter} (TP size {tp_size}) do "
                f"not fit pattern {pattern}: {exc}. Use a tensor-parallel size that keeps I/TP a multiple of "
                f"{pattern.col_multiple}, or expert parallelism"
            ) from exc

        for stem, shapes in (("w13", w13_shapes), ("w2", w2_shapes)):
            for suffix, shape in shapes.items():
                dtype = params_dtype if suffix == "sp_values" else torch.uint8
                param = torch.nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
                param.samoyeds_stem = stem
                param.samoyeds_suffix = suffix
                if suffix == "sp_meta":
                    param.dummy_weight_value = _DUMMY_META_BYTE
                elif suffix == "sp_rowsel":
                    param.dummy_weight_value = 0
                param.weight_loader = self._bind_loader(layer)
                layer.register_parameter(f"{stem}_{suffix}", param)

        ckpt_names = {
            "w1": getattr(layer, "ckpt_gate_proj_name", None) or "w1",
            "w3": getattr(layer, "ckpt_up_proj_name", None) or "w3",
            "w2": getattr(layer, "ckpt_down_proj_name", None) or "w2",
        }
        layer.samoyeds_state = _LayerState(
            name=name,
            pattern=pattern,
            num_local_experts=num_experts,
            hidden_size=hidden,
            intermediate_local=inter,
            intermediate_full=inter * tp_size,
            tp_rank=tp_rank,
            ckpt_names=ckpt_names,
            dummy=load_format() == "dummy",
        )

    def _bind_loader(self, layer: torch.nn.Module):
        def weight_loader(
            param: torch.nn.Parameter,
            loaded_weight: torch.Tensor,
            weight_name: str,
            shard_id: str,
            expert_id: int,
            return_success: bool = False,
        ) -> bool | None:
            return self.load_expert_tensor(
                layer, param, loaded_weight, weight_name, shard_id, expert_id, return_success=return_success
            )

        weight_loader.supports_moe_loading = True
        return weight_loader

    def load_expert_tensor(
        self,
        layer: torch.nn.Module,
        param: torch.nn.Parameter,
        loaded_weight: torch.Tensor,
        weight_name: str,
        shard_id: str,
        expert_id: int,
        return_success: bool = False,
    ) -> bool | None:
        """Copy this rank's part of one checkpoint tensor of one expert into the stacked parameter.

        Parameters
        ----------
        layer:
            The fused-MoE layer owning ``param``.
        param:
            One of ``w13_sp_*`` / ``w2_sp_*``.
        loaded_weight:
            The whole (unsharded) checkpoint tensor of one expert: for w1/w3 the canonical tensor of a dense
            ``[I_full, H]`` weight, for w2 of ``[H, I_full]``.
        weight_name:
            vLLM's name of the target (unused beyond messages).
        shard_id:
            ``"w1"`` (gate, rows ``[0, I)`` of w13), ``"w3"`` (up, rows ``[I, 2I)``) or ``"w2"``.
        expert_id:
            Global expert id.
        return_success:
            Return True when loaded, False when the expert lives on another rank.

        Raises
        ------
        ValueError
            If the tensor's shape or dtype does not match the layer, naming layer, expert and tensor.
        """
        state: _LayerState = layer.samoyeds_state
        stem, suffix = param.samoyeds_stem, param.samoyeds_suffix
        if shard_id not in _SHARDS or (shard_id == "w2") != (stem == "w2"):
            raise ValueError(f"{state.name}: shard {shard_id!r} cannot load into {stem}_{suffix} ({weight_name})")
        local = global_to_local_expert(layer, expert_id)
        if local < 0:
            return False if return_success else None
        key = state.key(expert_id, shard_id, suffix)
        if not 0 <= local < state.num_local_experts:
            raise ValueError(f"{key}: local expert slot {local} outside [0, {state.num_local_experts})")

        hidden, inter, full = state.hidden_size, state.intermediate_local, state.intermediate_full
        begin, end = state.tp_rank * inter, (state.tp_rank + 1) * inter
        if stem == "w13":
            n_out, n_in, rows, cols = full, hidden, (begin, end), None
        else:
            n_out, n_in, rows, cols = hidden, full, None, (begin, end)
        expected = packed_shapes(state.pattern, n_out, n_in)[suffix]
        if tuple(loaded_weight.shape) != expected:
            raise ValueError(
                f"{key}: expected shape {expected} for a dense [{n_out}, {n_in}] weight in pattern "
                f"{state.pattern}, got {tuple(loaded_weight.shape)}; the checkpoint does not match config.json"
            )
        if suffix == "sp_values":
            if not loaded_weight.is_floating_point():
                raise ValueError(f"{key}: expected a floating-point tensor, got {loaded_weight.dtype}")
        elif loaded_weight.dtype != torch.uint8:
            raise ValueError(f"{key}: expected dtype torch.uint8, got {loaded_weight.dtype}")

        piece = slice_packed_tensor(state.pattern, suffix, loaded_weight, n_out, n_in, rows=rows, cols=cols)
        target = param.data[local]
        if stem == "w13":
            half = (0, inter) if shard_id == "w1" else (inter, 2 * inter)
            target = slice_packed_tensor(state.pattern, suffix, target, 2 * inter, hidden, rows=half)
        target.copy_(piece)
        state.loaded.add((shard_id, suffix, local))
        return True if return_success else None

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Check completeness, validate the packed tensors, prepare them for the selected op (once).

        Raises
        ------
        ValueError
            Naming the first missing checkpoint tensor, or the corrupted one and its first bad index.
        """
        state: _LayerState = layer.samoyeds_state
        if state.dummy:
            layer.w13_sp_meta.data.fill_(_DUMMY_META_BYTE)
            layer.w2_sp_meta.data.fill_(_DUMMY_META_BYTE)
            if state.pattern.is_samoyeds:
                layer.w13_sp_rowsel.data.zero_()
                layer.w2_sp_rowsel.data.zero_()
        else:
            self._check_complete(layer, state)
        w13, w2 = self._packed(layer, "w13"), self._packed(layer, "w2")
        self._validate(layer, state, "w13", w13)
        self._validate(layer, state, "w2", w2)
        prepared = prepare_moe_weights(w13, w2)
        for name, tensor in prepared.tensors().items():
            if tensor is not None:
                setattr(layer, name, torch.nn.Parameter(tensor, requires_grad=False))
        layer.samoyeds_kernel_layout = prepared.kernel_layout
        _log_kernel_once(state.pattern, layer.w13_sp_values.device, prepared.kernel_layout)

    def _check_complete(self, layer: torch.nn.Module, state: _LayerState) -> None:
        suffixes = SUFFIXES if state.pattern.is_samoyeds else SUFFIXES[:2]
        missing = [
            (local, shard, suffix)
            for local in range(state.num_local_experts)
            for shard in _SHARDS
            for suffix in suffixes
            if (shard, suffix, local) not in state.loaded
        ]
        if missing:
            names = [state.key(_local_to_global(layer, e), shard, suffix) for e, shard, suffix in missing[:4]]
            more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
            raise ValueError(
                f"{state.name}: checkpoint tensors missing for this rank's experts: {', '.join(names)}{more}. "
                "The checkpoint is incomplete; re-run samoyeds-convert"
            )

    def _validate(self, layer: torch.nn.Module, state: _LayerState, stem: str, packed: PackedWeight) -> None:
        try:
            validate(packed, name=f"{state.name}.{stem}")
        except (TypeError, ValueError):
            pass
        else:
            return
        # Name the checkpoint tensor: validate expert by expert (and gate/up halves for w13).
        inter = state.intermediate_local
        for local in range(state.num_local_experts):
            expert = PackedWeight(
                packed.pattern,
                packed.values[local],
                packed.meta[local],
                None if packed.rowsel is None else packed.rowsel[local],
            )
            halves = (
                {"w1": expert.slice_out_features(0, inter), "w3": expert.slice_out_features(inter, 2 * inter)}
                if stem == "w13"
                else {"w2": expert}
            )
            for shard, part in halves.items():
                key = state.key(_local_to_global(layer, local), shard, "").removesuffix(".")
                validate(part, name=key)
        validate(packed, name=f"{state.name}.{stem}")  # not expert-local: report it as a whole

    @staticmethod
    def _packed(layer: torch.nn.Module, stem: str) -> PackedWeight:
        return PackedWeight(
            layer.samoyeds_state.pattern,
            getattr(layer, f"{stem}_sp_values"),
            getattr(layer, f"{stem}_sp_meta"),
            getattr(layer, f"{stem}_sp_rowsel", None),
        )

    # --- forward ---------------------------------------------------------------------------------------

    def get_fused_moe_quant_config(self, layer: torch.nn.Module):
        """None: the sparse op takes no quantization scales and no modular kernel is built."""
        return None

    def apply(
        self,
        layer: torch.nn.Module,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        shared_experts=None,
        shared_experts_input: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Routed experts on this rank: ``[T, H]`` partial sum (vLLM reduces over ranks, adds shared experts).

        Parameters
        ----------
        x:
            ``[T, H]`` activations in the model dtype.
        topk_weights:
            ``[T, k]`` fp32 routing weights from vLLM's router.
        topk_ids:
            ``[T, k]`` int32 global expert ids.
        shared_experts, shared_experts_input:
            Unused: vLLM runs shared experts itself when the method has no modular kernel.
        """
        weights = MoEWeights(
            self.pattern.chunk,
            layer.samoyeds_kernel_layout,
            layer.w13_sp_values,
            layer.w13_sp_meta,
            getattr(layer, "w13_sp_rowsel", None),
            layer.w2_sp_values,
            layer.w2_sp_meta,
            getattr(layer, "w2_sp_rowsel", None),
        )
        return moe_forward(x, topk_weights, topk_ids, weights, expert_map(layer))


def _log_kernel_once(pattern: SparsityPattern, device: torch.device, kernel_layout: bool) -> None:
    global _kernel_logged
    if _kernel_logged:
        return
    _kernel_logged = True
    logger.info(
        "samoyeds: vLLM fused-MoE layers (pattern %s, %s) run %s",
        pattern,
        device,
        "samoyeds::moe_sparse_prepacked (CUDA kernel layout)"
        if kernel_layout
        else "samoyeds::moe_sparse (canonical layout, exact torch reference)",
    )
