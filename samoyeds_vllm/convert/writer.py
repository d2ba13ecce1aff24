"""Write a sparse (or dense reference) checkpoint directory: safetensors shards, config.json, tokenizer files."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

__all__ = ["TOKENIZER_FILES", "copy_tokenizer_files", "write_checkpoint"]

logger = logging.getLogger(__name__)

#: Files copied from the source model directory unchanged (whichever exist).
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)

_DEFAULT_SHARD_BYTES = 5 * 1024**3


def copy_tokenizer_files(source_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Copy the tokenizer and generation files of ``source_dir`` into ``out_dir``; returns the names copied."""
    source_dir, out_dir = Path(source_dir), Path(out_dir)
    copied = []
    for name in TOKENIZER_FILES:
        if (source_dir / name).is_file():
            shutil.copyfile(source_dir / name, out_dir / name)
            copied.append(name)
    return copied


def _shards(tensors: Mapping[str, torch.Tensor], max_shard_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor.contiguous()
        size += nbytes
    return shards


def write_checkpoint(
    out_dir: str | Path,
    tensors: Mapping[str, torch.Tensor],
    config: Mapping[str, object],
    *,
    quantization_config: Mapping[str, object] | None = None,
    source_dir: str | Path | None = None,
    max_shard_bytes: int = _DEFAULT_SHARD_BYTES,
) -> Path:
    """Write ``tensors`` and ``config`` as a Hugging Face model directory.

    Parameters
    ----------
    out_dir:
        Created if missing. Existing model files in it are overwritten.
    tensors:
        The state dict to save (on-disk key names).
    config:
        The model's ``config.json`` content (``PretrainedConfig.to_dict()``); must name ``architectures``.
    quantization_config:
        Stored as ``config["quantization_config"]`` (see ``sparsify.build_quantization_config``); None removes any
        quantization block (dense reference checkpoints).
    source_dir:
        Copy tokenizer and generation files from here (``TOKENIZER_FILES``).
    max_shard_bytes:
        Largest safetensors shard; several shards get a ``model.safetensors.index.json``.

    Returns
    -------
    Path
        ``out_dir``.

    Raises
    ------
    ValueError
        If ``config`` has no ``architectures`` (vLLM refuses such checkpoints) or ``tensors`` is empty.
    """
    out_dir = Path(out_dir)
    if not config.get("architectures"):
        raise ValueError(f"config for {out_dir}: 'architectures' must be set (e.g. ['MixtralForCausalLM'])")
    if not tensors:
        raise ValueError(f"write_checkpoint({out_dir}): no tensors to write")
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*out_dir.glob("model*.safetensors"), out_dir / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)

    shards = _shards(tensors, max_shard_bytes)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata=metadata)
    else:
        weight_map = {}
        total = 0
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out_dir / name), metadata=metadata)
            for key, tensor in shard.items():
                weight_map[key] = name
                total += tensor.numel() * tensor.element_size()
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    config = dict(config)
    config.pop("quantization_config", None)
    if quantization_config is not None:
        config["quantization_config"] = dict(quantization_config)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if source_dir is not None:
        copy_tokenizer_files(source_dir, out_dir)
    logger.info("wrote %d tensors in %d shard(s) to %s", len(tensors), len(shards), out_dir)
    return out_dir
