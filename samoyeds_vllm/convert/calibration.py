"""Calibration for ``--method wanda|sparsegpt``: run the dense model layer by layer and prune each layer's experts.

Orchestration only; the math is ``pruning.wanda_scores`` and ``pruning.sparsegpt_prune``. The model is built on the
meta device (no memory) and only one decoder layer is materialised at a time, from the source shards:

1. tokenize the calibration text into ``N`` sequences of ``L`` tokens; run the embeddings and capture the inputs of
   decoder layer 0 (hidden states and the layer's keyword arguments: rotary embeddings, mask, positions);
2. for every decoder layer: load its dense weights (per-expert keys are stacked into Transformers' fused
   ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``), then
   a. forward with hooks on the experts module that collect, per expert, statistics of its *routed* tokens
      (count, ``sum s x^2`` per channel for Wanda, ``sum s x x^T`` for SparseGPT, ``s`` = 1 or the routing
      probability with ``--router-weighted``); shared experts (when targeted) see all tokens;
   b. prune gate and up projections, write them back; forward again to collect the inputs of the down projection
      as the *pruned* gate/up produce them (``act(x W1'^T) * (x W3'^T)``), prune down;
   c. forward the pruned layer to get the next layer's inputs (sequential pruning, as in SparseGPT);
   d. move the layer back to the meta device.

Memory: one decoder layer in fp32, the calibration hidden states (``N * L * H`` fp32), and for SparseGPT the
per-expert Hessians of one layer (``E * (H^2 + I^2)`` fp32: 2.4 GB for Qwen3-30B-A3B). Runs on CUDA when present.
Experts that receive no calibration token are pruned by magnitude, with one warning per layer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..pruning import hessian_inverse_factor, magnitude_scores, select_mask, sparsegpt_prune, wanda_scores
from .sparsify import canonical_key, split_expert_tensors

if TYPE_CHECKING:
    from .pipeline import ConvertPlan

__all__ = ["LayerwiseCalibrator", "load_calibration_tokens"]

logger = logging.getLogger(__name__)

# Calibration sequences per forward call (bounds activation memory; does not change the statistics).
_BATCH = 8

_FUSED_EXPERTS = re.compile(r"^(?P<layer>.+)\.mlp\.experts\.(?P<name>gate_up_proj|down_proj)$")


def load_calibration_tokens(path: str | Path, tokenizer, num_samples: int, seq_len: int) -> torch.Tensor:
    """Tokenize a calibration file into ``[N, L]`` int64 token ids (consecutive windows of the text).

    Parameters
    ----------
    path:
        ``.txt`` (the whole file is one text) or ``.jsonl`` (one JSON object with a ``"text"`` string per line).
    tokenizer:
        A Transformers tokenizer; documents are joined with its EOS token.
    num_samples, seq_len:
        ``N`` and ``L``; fewer sequences are returned (with a warning) if the text is too short.

    Raises
    ------
    ValueError
        For a JSONL line without a ``"text"`` string, or a text of fewer than 2 tokens.
    """
    path = Path(path)
    if path.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: invalid JSON ({err})") from err
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{number}: each line must be an object with a 'text' string")
            texts.append(record["text"])
    else:
        texts = [path.read_text()]
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None and len(texts) > 1:
            ids.append(tokenizer.eos_token_id)
    if len(ids) < 2:
        raise ValueError(f"--calibration {path}: only {len(ids)} token(s); give more text")
    count = min(num_samples, len(ids) // seq_len)
    if count == 0:
        count, seq_len = 1, len(ids)
    if count < num_samples:
        logger.warning(
            "calibration text %s has %d tokens: using %d sequence(s) of %d tokens instead of %d",
            path,
            len(ids),
            count,
            seq_len,
            num_samples,
        )
    return torch.tensor(ids[: count * seq_len], dtype=torch.long).view(count, seq_len)


class _Stats:
    """Running statistics of one weight's inputs ``x [T, n]`` with token weights ``s [T]``."""

    def __init__(self, n: int, hessian: bool, device: torch.device) -> None:
        self.tokens = 0
        self.sq_sum = torch.zeros(n, dtype=torch.float32, device=device)
        self.hessian = torch.zeros(n, n, dtype=torch.float32, device=device) if hessian else None
        self._factor: tuple[torch.Tensor, torch.Tensor] | None = None

    def inverse_factor(self) -> tuple[torch.Tensor, torch.Tensor]:
        """SparseGPT's inverse-Hessian factor, computed once and shared by the weights that read these inputs."""
        if self._factor is None:
            self._factor = hessian_inverse_factor(self.hessian)
        return self._factor

    def add(self, x: torch.Tensor, s: torch.Tensor | None) -> None:
        xs = x if s is None else x * s[:, None]
        self.tokens += x.shape[0]
        self.sq_sum += (xs * x).sum(0)
        if self.hessian is not None:
            self.hessian += xs.T @ x


class _StopForward(Exception):
    """Raised by the layer-0 catcher once it has the layer's inputs."""


class _Catcher(nn.Module):
    """Stands in for decoder layer 0: records its inputs, then stops the forward."""

    def __init__(self, wrapped: nn.Module, sink: list) -> None:
        super().__init__()
        self.wrapped = wrapped
        self._sink = sink

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("wrapped"), name)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        self._sink.append((hidden_states, args, kwargs))
        raise _StopForward


def _experts_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = list(args) + [kwargs[n] for n in names[len(args) :] if n in kwargs]
    if len(values) < 3:
        raise ValueError("calibration: experts module called without (hidden_states, top_k_index, top_k_weights)")
    return values[0], values[1], values[2]


class LayerwiseCalibrator:
    """Runs the dense model one decoder layer at a time and prunes each layer's experts from their routed tokens.

    Parameters
    ----------
    conversion:
        The validated plan (``pipeline.ConvertPlan``) of a ``wanda`` or ``sparsegpt`` conversion.

    Raises
    ------
    ValueError
        If Transformers cannot build the architecture or the tokenizer is missing from SRC_DIR.
    """

    def __init__(self, conversion: ConvertPlan) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        self.conversion = conversion
        options, source = conversion.options, conversion.source
        self.source, self.layout, self.pattern = source, source.layout, conversion.pattern
        self.method = options.method
        self.router_weighted = options.router_weighted
        self.device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.fallback_weights = 0
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(source.root))
        except (OSError, ValueError) as err:
            raise ValueError(f"calibration needs the tokenizer files in SRC_DIR {source.root}: {err}") from err
        self.tokens = load_calibration_tokens(
            options.calibration, tokenizer, options.num_calibration_samples, options.calibration_seq_len
        )
        config = AutoConfig.from_pretrained(str(source.root))
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        self.model.eval()
        self.decoder = self.model.get_decoder()
        self.layers: nn.ModuleList = self.decoder.layers
        self.layers_prefix = next(name for name, m in self.model.named_modules() if m is self.layers)
        self.prune_keys = self._prune_keys()
        self.inputs = self._capture_layer0_inputs()
        logger.info(
            "calibration: %d x %d tokens on %s, method %s%s",
            *self.tokens.shape,
            self.device,
            self.method,
            ", router-weighted" if self.router_weighted else "",
        )

    def provenance(self) -> dict[str, object]:
        """Calibration settings for ``quantization_config.pruning``."""
        options = self.conversion.options
        return {
            "calibration": {
                "file": Path(options.calibration).name,
                "samples": int(self.tokens.shape[0]),
                "seq_len": int(self.tokens.shape[1]),
                "tokens": int(self.tokens.numel()),
            },
            **({"damp": 0.01, "block_size": 128} if self.method == "sparsegpt" else {}),
        }

    # --- weights -----------------------------------------------------------------------------------------------

    def _prune_keys(self) -> dict[int, set[str]]:
        from .pipeline import KIND_ROUTED, KIND_SHARED

        keys: dict[int, set[str]] = {}
        for t in self.conversion.tensors:
            if t.kind == KIND_ROUTED:
                meta = torch.empty(self.source.tensors[t.key][1], device="meta")
                dense = [d for d, *_ in split_expert_tensors(t.key, meta, self.layout) or ()]
                keys.setdefault(t.layer, set()).update(dense)
            elif t.kind == KIND_SHARED:
                keys.setdefault(t.layer, set()).add(t.key)
        return keys

    def _read(self, key: str) -> torch.Tensor:
        if key in self.source.tensors:
            return self.source.read(key)
        disk = canonical_key(key, self.layout)
        if disk in self.source.tensors:
            return self.source.read(disk)
        fused = _FUSED_EXPERTS.match(key)
        if fused is None:
            raise ValueError(f"calibration: tensor {key} (or {disk}) is not in {self.source.root}")
        layer, gate, up, down = fused["layer"], *self.layout.projections
        experts = []
        for expert in range(self._num_experts(layer)):
            if fused["name"] == "gate_up_proj":
                parts = [self.source.read(self.layout.expert_key(layer, expert, p, "weight")) for p in (gate, up)]
                experts.append(torch.cat(parts))
            else:
                experts.append(self.source.read(self.layout.expert_key(layer, expert, down, "weight")))
        return torch.stack(experts)

    def _num_experts(self, layer_prefix: str) -> int:
        stem = f"{layer_prefix}.{self.layout.moe_module}.experts."
        ids = {int(k[len(stem) :].split(".", 1)[0]) for k in self.source.tensors if k.startswith(stem)}
        if not ids:
            raise ValueError(f"calibration: no expert tensors under {stem} in {self.source.root}")
        return max(ids) + 1

    def _load(self, module: nn.Module, prefix: str) -> None:
        state = {}
        for name, meta in module.state_dict().items():
            tensor = self._read(f"{prefix}.{name}")
            if tuple(tensor.shape) != tuple(meta.shape):
                raise ValueError(
                    f"calibration: {prefix}.{name} has shape {tuple(tensor.shape)} in the checkpoint, the model "
                    f"config expects {tuple(meta.shape)}"
                )
            state[name] = tensor.to(device=self.device, dtype=meta.dtype if meta.is_floating_point() else None)
        module.load_state_dict(state, strict=True, assign=True)
        still_meta = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        if still_meta:
            raise ValueError(f"calibration: {prefix} has tensors the checkpoint cannot fill: {still_meta[:3]}")

    def _capture_layer0_inputs(self) -> list[tuple[torch.Tensor, tuple, dict]]:
        embed = self.decoder.get_input_embeddings()
        embed_name = next(name for name, m in self.model.named_modules() if m is embed)
        self._load(embed, embed_name)
        rotary = getattr(self.decoder, "rotary_emb", None)
        if rotary is not None:
            self.decoder.rotary_emb = type(rotary)(config=self.model.config).to(self.device)
        sink: list[tuple[torch.Tensor, tuple, dict]] = []
        first = self.layers[0]
        self.layers[0] = _Catcher(first, sink)
        try:
            with torch.no_grad():
                for batch in self.tokens.split(_BATCH):
                    with contextlib.suppress(_StopForward):
                        self.decoder(input_ids=batch.to(self.device), use_cache=False)
        finally:
            self.layers[0] = first
        embed.to("meta")
        return sink

    # --- per layer ---------------------------------------------------------------------------------------------

    def _forward(self, layer: nn.Module) -> list[torch.Tensor]:
        outputs = []
        with torch.no_grad():
            for hidden, args, kwargs in self.inputs:
                out = layer(hidden, *args, **kwargs)
                outputs.append(out[0] if isinstance(out, tuple) else out)
        return outputs

    def _collect(self, layer: nn.Module, hooks: list[tuple[nn.Module, Callable]]) -> None:
        handles = [module.register_forward_pre_hook(fn, with_kwargs=True) for module, fn in hooks]
        try:
            self._forward(layer)
        finally:
            for handle in handles:
                handle.remove()

    def _prune(self, dense_key: str, weight: torch.Tensor, stats: _Stats | None) -> tuple[torch.Tensor, torch.Tensor]:
        weight = weight.float()
        if stats is None or stats.tokens == 0:
            self.fallback_weights += 1
            return weight, select_mask(magnitude_scores(weight), self.pattern)
        if self.method == "wanda":
            return weight, select_mask(wanda_scores(weight, stats.sq_sum), self.pattern)
        return sparsegpt_prune(weight, stats.hessian, self.pattern, inverse_factor=stats.inverse_factor())

    def prune_layer(self, index: int) -> Callable[[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """Calibrate and prune decoder layer ``index``; returns the pruner the converter applies to its weights.

        Layers the model does not run (e.g. DeepSeek-V3 multi-token-prediction layers) are pruned by magnitude.
        """
        if index >= len(self.layers):
            logger.warning("layer %d is not run by the model's forward: its experts are pruned by magnitude", index)
            return self._magnitude_pruner()
        layer_prefix = f"{self.layers_prefix}.{index}"
        layer = self.layers[index]
        self._load(layer, layer_prefix)
        wanted = self.prune_keys.get(index, set())
        hessian = self.method == "sparsegpt"
        results: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        stats: dict[tuple[str, str], _Stats] = {}
        experts_modules = self._experts_modules(layer, layer_prefix, wanted)
        shared_modules = self._shared_modules(layer, layer_prefix, wanted)

        def routed_hook(module: nn.Module, phase: str) -> Callable:
            def hook(_mod, args, kwargs):
                hidden, top_idx, top_w = _experts_inputs(args, kwargs)
                x = hidden.reshape(-1, hidden.shape[-1]).float()
                for expert in top_idx.unique().tolist():
                    rows, slots = (top_idx == expert).nonzero(as_tuple=True)
                    xe = x[rows]
                    s = top_w[rows, slots].float() if self.router_weighted else None
                    if phase == "down":
                        gate_up = module.gate_up_proj[expert].float()
                        half = gate_up.shape[0] // 2
                        xe = module.act_fn(xe @ gate_up[:half].T) * (xe @ gate_up[half:].T)
                    key = (f"{id(module)}.{expert}", phase)
                    if key not in stats:
                        stats[key] = _Stats(xe.shape[1], hessian, self.device)
                    stats[key].add(xe, s)

            return hook

        def linear_hook(key: tuple[str, str]) -> Callable:
            def hook(_mod, args, kwargs):
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                if key not in stats:
                    stats[key] = _Stats(x.shape[1], hessian, self.device)
                stats[key].add(x, None)

            return hook

        gate, up, down = self.layout.projections
        for phase in ("gate_up", "down"):
            hooks = [(m, routed_hook(m, phase)) for m, _ in experts_modules]
            first_proj = down if phase == "down" else gate
            hooks += [(getattr(m, first_proj), linear_hook((n, phase))) for m, n in shared_modules]
            self._collect(layer, hooks)
            projs = (down,) if phase == "down" else (gate, up)
            for module, disk_prefix in experts_modules:
                no_tokens = []
                for expert in range(module.gate_up_proj.shape[0]):
                    stat = stats.get((f"{id(module)}.{expert}", phase))
                    if stat is None or stat.tokens == 0:
                        no_tokens.append(expert)
                    for proj in projs:
                        dense_key = f"{disk_prefix}.{expert}.{proj}.weight"
                        results[dense_key] = self._prune_expert(module, expert, proj, dense_key, stat)
                if no_tokens:
                    logger.warning(
                        "%s: experts %s received no calibration tokens; their %s weights are pruned by magnitude",
                        disk_prefix,
                        no_tokens,
                        "/".join(projs),
                    )
            for module, name in shared_modules:
                for proj in projs:
                    linear = getattr(module, proj)
                    dense_key = f"{name}.{proj}.weight"
                    pruned, mask = self._prune(dense_key, linear.weight.data, stats.get((name, phase)))
                    linear.weight.data.copy_(pruned)
                    results[dense_key] = (pruned.cpu(), mask.cpu())
        outputs = self._forward(layer)
        self.inputs = [(out, args, kwargs) for out, (_, args, kwargs) in zip(outputs, self.inputs, strict=True)]
        self.layers[index] = layer.to("meta")
        fallback = self._magnitude_pruner()

        def pruner(dense_key: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if dense_key in results:
                return results.pop(dense_key)
            logger.warning("%s: not seen by calibration; pruned by magnitude", dense_key)
            return fallback(dense_key, weight)

        return pruner

    def _prune_expert(
        self, module: nn.Module, expert: int, proj: str, dense_key: str, stat: _Stats | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        gate, _, down = self.layout.projections
        if proj == down:
            param, rows = module.down_proj, slice(None)
        else:
            half = module.gate_up_proj.shape[1] // 2
            param, rows = module.gate_up_proj, slice(0, half) if proj == gate else slice(half, 2 * half)
        pruned, mask = self._prune(dense_key, param.data[expert, rows], stat)
        param.data[expert, rows] = pruned.to(param.dtype)
        return pruned.cpu(), mask.cpu()

    def _experts_modules(self, layer: nn.Module, layer_prefix: str, wanted: set[str]) -> list[tuple[nn.Module, str]]:
        found = []
        for name, module in layer.named_modules():
            if isinstance(getattr(module, "gate_up_proj", None), torch.Tensor) and name.endswith("experts"):
                disk_prefix = canonical_key(f"{layer_prefix}.{name}", self.layout)
                if f"{disk_prefix}.0.{self.layout.gate}.weight" in wanted:
                    found.append((module, disk_prefix))
        return found

    def _shared_modules(self, layer: nn.Module, layer_prefix: str, wanted: set[str]) -> list[tuple[nn.Module, str]]:
        found = []
        for name, module in layer.named_modules():
            full = f"{layer_prefix}.{name}"
            if name.rsplit(".", 1)[-1] in self.layout.shared_modules and f"{full}.{self.layout.gate}.weight" in wanted:
                found.append((module, full))
        return found

    def _magnitude_pruner(self) -> Callable[[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        def prune(dense_key: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            self.fallback_weights += 1
            return weight, select_mask(magnitude_scores(weight), self.pattern)

        return prune
