"""Synthetic samoyeds checkpoints: random weights of any config, written sparse directly (``--synthetic``).

For serving benchmarks at real scale without a download: the packed expert tensors are drawn directly in the
on-disk format (random values, random *valid* 2:4 metadata, random row selections), so no dense expert weight is
ever materialised. Non-expert tensors are random normal (std ``initializer_range``), norms are ones and biases
zeros. Tensors stream into shards as for a real conversion; the directory appears atomically, with a config.json
(``architectures`` kept, samoyeds ``quantization_config``), a generation config and a small byte-level BPE tokenizer
padded to the model's vocabulary size.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..formats import PackedWeight, SparsityPattern, parse_pattern
from .architectures import get_layout
from .sparsify import build_quantization_config, canonical_key, split_expert_tensors
from .writer import ShardWriter, write_config_json

__all__ = [
    "checkpoint_nbytes",
    "random_packed",
    "write_synthetic_checkpoint",
    "write_synthetic_dense_checkpoint",
    "write_synthetic_tokenizer",
]

logger = logging.getLogger(__name__)

#: Special tokens of the synthetic tokenizer, ids 0-3.
SPECIAL_TOKENS: tuple[str, ...] = ("<s>", "</s>", "<unk>", "<pad>")

_TOKENIZER_TEXT = (
    "the quick brown fox jumps over the lazy dog . a sparse mixture of experts routes every token to a few "
    "experts ; each expert is a small feed forward network . samoyeds prunes expert weights to a two of four "
    "pattern and packs them . vllm serves the model and transformers loads it . hello world , how are you today ? "
    "one two three four five six seven eight nine ten . numbers 0 1 2 3 4 5 6 7 8 9 and letters abcdefghijklmnop"
)

# The six legal (p0 < p1) position nibbles of a 2:4 group: p0 | p1 << 2.
_NIBBLES = torch.tensor([p0 | p1 << 2 for p0 in range(4) for p1 in range(p0 + 1, 4)], dtype=torch.uint8)

_DEFAULT_SHARD_BYTES = 5 * 10**9


def write_synthetic_tokenizer(out_dir: str | Path, vocab_size: int = 512, pad_to: int | None = None):
    """Train a small byte-level BPE tokenizer in-process and save it (ids 0-3 = ``<s> </s> <unk> <pad>``).

    Parameters
    ----------
    out_dir:
        Directory to save ``tokenizer.json`` and ``tokenizer_config.json`` into.
    vocab_size:
        Upper bound of the learned vocabulary (it learns at most ``vocab_size - 32`` entries; keep it <= the
        model's vocabulary).
    pad_to:
        If given, fill the vocabulary with placeholder tokens ``<|xN|>`` (never produced by encoding, decoded as
        their text) up to exactly this many ids, so every id the model can sample has a token (vLLM checks
        prompt ids and detokenizes against the tokenizer). Synthetic checkpoints pass the model's vocab size.

    Returns
    -------
    transformers.PreTrainedTokenizerFast
        The saved tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 32,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_TOKENIZER_TEXT] * 4, trainer=trainer)
    if pad_to is not None and pad_to > tokenizer.get_vocab_size():
        data = json.loads(tokenizer.to_str())
        vocab = data["model"]["vocab"]
        vocab.update({f"<|x{i}|>": i for i in range(len(vocab), pad_to)})
        tokenizer = Tokenizer.from_str(json.dumps(data))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.save_pretrained(str(out_dir))
    return fast


def random_packed(
    n_out: int,
    n_in: int,
    pattern: str | SparsityPattern,
    dtype: torch.dtype,
    generator: torch.Generator,
    std: float = 0.02,
) -> PackedWeight:
    """A random packed weight of dense shape ``[O, I]`` that ``formats.validate`` accepts.

    Values are normal with standard deviation ``std``; every group's positions are one of the six legal ascending
    pairs, uniformly; row selections are uniform 0/1.

    Raises
    ------
    ValueError
        If ``[O, I]`` cannot be tiled by the pattern.
    """
    pattern = parse_pattern(pattern)
    pattern.check_shape(n_out, n_in, name="random_packed")
    rows = n_out // pattern.row_group
    values = _randn((rows, n_in // 2), dtype, generator, std)
    low = _NIBBLES[torch.randint(0, 6, (rows, n_in // 8), generator=generator)]
    high = _NIBBLES[torch.randint(0, 6, (rows, n_in // 8), generator=generator)]
    rowsel = None
    if pattern.is_samoyeds:
        rowsel = torch.randint(0, 2, (n_out // 2, n_in // pattern.chunk), generator=generator, dtype=torch.uint8)
    return PackedWeight(pattern, values, low | (high << 4), rowsel)


# Random tensors are drawn in fp32 in chunks of this many elements and cast into the output, so a large tensor
# (a 151936 x 2048 embedding) never exists in fp32 in full.
_RANDN_CHUNK = 1 << 24


def _randn(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator, std: float) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype)
    flat = out.view(-1)
    for start in range(0, flat.numel(), _RANDN_CHUNK):
        count = min(_RANDN_CHUNK, flat.numel() - start)
        flat[start : start + count] = torch.randn(count, generator=gen).mul_(std)
    return out


def _dense_random(key: str, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator, std: float):
    name = key.rsplit(".", 2)
    leaf = name[-1]
    module = name[-2] if len(name) > 1 else ""
    if leaf == "bias" or "bias" in leaf:
        return torch.zeros(shape, dtype=dtype)
    if len(shape) == 1 and ("norm" in module or "norm" in leaf or "layernorm" in key):
        return torch.ones(shape, dtype=dtype)
    return _randn(shape, dtype, gen, std)


def _model_plan(config_path: Path, dtype: torch.dtype):
    """``(raw config dict, PretrainedConfig, ExpertLayout, [(key, meta tensor, expert parts or None)])``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        raw = json.loads(Path(config_path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--synthetic {config_path}: cannot read a JSON config ({err})") from err
    if not isinstance(raw.get("model_type"), str) or not raw.get("architectures"):
        raise ValueError(f"--synthetic {config_path}: the config needs 'model_type' and 'architectures'")
    layout = get_layout(raw["model_type"])
    raw.pop("quantization_config", None)
    config = AutoConfig.for_model(**raw)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    plan = []
    for key, meta in model.state_dict().items():
        if tied and key == "lm_head.weight":
            continue
        plan.append((key, meta, split_expert_tensors(key, meta, layout)))
    if not any(parts for *_, parts in plan):
        raise ValueError(f"--synthetic {config_path}: the model has no routed experts")
    return raw, config, layout, plan


def _plan_nbytes(plan, pattern: SparsityPattern | None, dtype: torch.dtype) -> int:
    dense = sum(meta.numel() for _, meta, parts in plan if not parts) * dtype.itemsize
    experts = [w.numel() for *_, parts in plan for *_, w in parts or ()]
    if pattern is None:
        return dense + sum(experts) * dtype.itemsize
    return dense + sum(int(n * pattern.bytes_per_weight(dtype.itemsize)) for n in experts)


def checkpoint_nbytes(
    config_path: str | Path, pattern: str | SparsityPattern | None, dtype: torch.dtype = torch.bfloat16
) -> int:
    """Bytes of the tensors of a checkpoint of ``config_path``: routed experts packed in ``pattern`` (dense if
    None), everything else dense in ``dtype`` (what ``write_synthetic_checkpoint`` would write)."""
    _, _, _, plan = _model_plan(Path(config_path), dtype)
    return _plan_nbytes(plan, None if pattern is None else parse_pattern(pattern), dtype)


def write_synthetic_dense_checkpoint(
    config_path: str | Path,
    out_dir: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    max_shard_bytes: int = _DEFAULT_SHARD_BYTES,
) -> int:
    """Write a random *dense* checkpoint (per-expert keys, sharded, plus tokenizer) to test or benchmark conversion.

    Parameters
    ----------
    config_path:
        A Hugging Face ``config.json`` with ``model_type`` and ``architectures``.
    out_dir:
        Created (must not exist).
    dtype, seed:
        Dtype and seed of the random weights (expert weights normal with std ``initializer_range``).
    max_shard_bytes:
        Largest shard.

    Returns
    -------
    int
        Bytes of tensors written.
    """
    raw, config, layout, plan = _model_plan(Path(config_path), dtype)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True)
    std = float(getattr(config, "initializer_range", 0.02))
    gen = torch.Generator().manual_seed(seed)
    writer = ShardWriter(out_dir, max_shard_bytes)
    for key, meta, parts in plan:
        if not parts:
            writer.add(canonical_key(key, layout), _dense_random(key, tuple(meta.shape), dtype, gen, std))
            continue
        for dense_key, *_, weight in parts:
            writer.add(dense_key, _randn(tuple(weight.shape), dtype, gen, std))
    writer.close()
    write_config_json(out_dir, {**raw, "dtype": str(dtype).removeprefix("torch.")}, None)
    vocab = int(getattr(config, "vocab_size", 512))
    write_synthetic_tokenizer(out_dir, min(vocab, 512), pad_to=vocab)
    return writer.total_bytes


def write_synthetic_checkpoint(
    config_path: str | Path,
    out_dir: str | Path,
    pattern: str | SparsityPattern,
    *,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    max_shard_size: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
):
    """Write a random-weight samoyeds checkpoint of the model described by ``config_path``.

    Parameters
    ----------
    config_path:
        A Hugging Face ``config.json`` (``model_type`` and ``architectures`` required), e.g. Qwen3-30B-A3B's.
    out_dir:
        Directory to create (atomically; see ``pipeline.atomic_output_dir``).
    pattern:
        ``"2:4"`` or ``"1:2:V+2:4"``.
    dtype:
        Dtype of values and every float tensor.
    seed:
        Seed of all random draws.
    max_shard_size:
        Largest output shard (e.g. ``"5GB"``); 5 GB by default.
    overwrite:
        Replace ``out_dir`` if it exists.
    progress:
        Show a tqdm bar over output bytes.

    Returns
    -------
    pipeline.ConvertSummary
        Layers, experts, bytes written, time.

    Raises
    ------
    ValueError
        For a config without ``model_type``/``architectures``, an unsupported architecture, expert shapes the
        pattern cannot tile, or an existing ``out_dir`` without ``overwrite``.
    """
    from transformers import GenerationConfig

    from .pipeline import ConvertSummary, atomic_output_dir, parse_size

    config_path, out_dir = Path(config_path), Path(out_dir)
    pattern = parse_pattern(pattern)
    raw, config, layout, plan = _model_plan(config_path, dtype)
    for *_, parts in plan:
        for dense_key, *_, weight in parts or ():
            pattern.check_shape(weight.shape[0], weight.shape[1], name=dense_key)
    if out_dir.exists() and not overwrite:
        raise ValueError(f"OUT_DIR {out_dir} already exists; pass --overwrite to replace it")

    std = float(getattr(config, "initializer_range", 0.02))
    gen = torch.Generator().manual_seed(seed)
    total = _plan_nbytes(plan, pattern, dtype)
    start = time.perf_counter()
    experts: set[tuple[str, int]] = set()
    weights = 0
    max_shard = parse_size(max_shard_size) if max_shard_size else _DEFAULT_SHARD_BYTES
    with atomic_output_dir(out_dir, overwrite) as tmp:
        writer = ShardWriter(tmp, max_shard)
        with tqdm(total=total, unit="B", unit_scale=True, disable=not progress, desc="synthetic") as bar:
            for key, meta, parts in plan:
                if not parts:
                    tensor = _dense_random(key, tuple(meta.shape), dtype, gen, std)
                    writer.add(canonical_key(key, layout), tensor)
                    bar.update(tensor.numel() * tensor.element_size())
                    continue
                for _, layer_prefix, expert, proj, weight in parts:
                    packed = random_packed(weight.shape[0], weight.shape[1], pattern, dtype, gen, std)
                    stem = layout.expert_key(layer_prefix, expert, proj, "").removesuffix(".")
                    for suffix, tensor in packed.tensors().items():
                        writer.add(f"{stem}.{suffix}", tensor)
                    experts.add((layer_prefix, expert))
                    weights += 1
                    bar.update(packed.nbytes)
        writer.close()
        out_config = dict(raw)
        out_config["dtype"] = str(dtype).removeprefix("torch.")
        quant = build_quantization_config(
            pattern, pruning={"method": "synthetic", "seed": seed, "source": config_path.name, "std": std}
        )
        write_config_json(tmp, out_config, quant)
        vocab = int(getattr(config, "vocab_size", 512))
        write_synthetic_tokenizer(tmp, min(vocab, 512), pad_to=vocab)
        generation = {k: raw[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if raw.get(k) is not None}
        GenerationConfig(**generation).save_pretrained(str(tmp))
    layers = {prefix for prefix, _ in experts}
    logger.info("synthetic checkpoint %s: %d layers, %d experts", out_dir, len(layers), len(experts))
    return ConvertSummary(
        output=out_dir,
        layers=len(layers),
        experts=len(experts),
        weights_pruned=weights,
        density=pattern.density,
        bytes_in=0,
        bytes_out=writer.total_bytes,
        seconds=time.perf_counter() - start,
        per_kind={},
    )
