"""Write a sparse (or dense reference) checkpoint directory: safetensors shards, config.json, tokenizer files."""

from __future__ import annotations

import json
import logging
import shutil
import struct
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

__all__ = [
    "TOKENIZER_FILES",
    "ShardWriter",
    "copy_tokenizer_files",
    "write_checkpoint",
    "write_config_json",
    "write_safetensors",
]

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

    write_config_json(out_dir, config, quantization_config)
    if source_dir is not None:
        copy_tokenizer_files(source_dir, out_dir)
    logger.info("wrote %d tensors in %d shard(s) to %s", len(tensors), len(shards), out_dir)
    return out_dir


def write_config_json(
    out_dir: str | Path, config: Mapping[str, object], quantization_config: Mapping[str, object] | None
) -> Path:
    """Write ``config.json`` into ``out_dir`` with ``quantization_config`` replacing any existing block.

    Raises
    ------
    ValueError
        If ``config`` has no ``architectures`` (vLLM refuses such checkpoints).
    """
    out_dir = Path(out_dir)
    if not config.get("architectures"):
        raise ValueError(f"config for {out_dir}: 'architectures' must be set (e.g. ['MixtralForCausalLM'])")
    config = dict(config)
    config.pop("quantization_config", None)
    if quantization_config is not None:
        config["quantization_config"] = dict(quantization_config)
    path = out_dir / "config.json"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str]) -> None:
    """Write a safetensors file tensor by tensor, without building the whole file in memory.

    ``safetensors.torch.save_file`` first converts every tensor to ``bytes`` (a second copy of the shard); this
    writes the header, then each tensor's memory directly (little-endian hosts only, as safetensors itself).

    Raises
    ------
    TypeError
        For a dtype safetensors cannot store.
    """
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for key, tensor in tensors.items():
        if tensor.dtype not in _DTYPE_NAMES:
            raise TypeError(f"write_safetensors: tensor {key} has dtype {tensor.dtype}, which safetensors cannot store")
        nbytes = tensor.numel() * tensor.element_size()
        header[key] = {
            "dtype": _DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the spec allows trailing spaces; 8-byte alignment of the data
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(blob)))
        handle.write(blob)
        for tensor in tensors.values():
            flat = tensor.detach().contiguous().cpu().reshape(-1)
            if flat.numel():
                handle.write(flat.view(torch.uint8).numpy().data)


class ShardWriter:
    """Stream tensors into safetensors shards of bounded size (only the current shard is held in memory).

    Shards are first written under temporary names; ``close`` renames them to the Hugging Face names
    (``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``), since
    the shard count is only known at the end.

    Parameters
    ----------
    out_dir:
        Existing directory to write into.
    max_shard_bytes:
        A shard is written once adding the next tensor would pass this size (a single larger tensor gets its own
        shard).
    """

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = _DEFAULT_SHARD_BYTES) -> None:
        if max_shard_bytes <= 0:
            raise ValueError(f"ShardWriter: max_shard_bytes must be > 0, got {max_shard_bytes}")
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.total_bytes = 0
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._parts: list[tuple[Path, list[str]]] = []
        self._keys: set[str] = set()

    def add(self, key: str, tensor: torch.Tensor) -> None:
        """Queue ``tensor`` under ``key``; writes the current shard first if ``tensor`` would overflow it.

        Raises
        ------
        ValueError
            If ``key`` was already added.
        """
        if key in self._keys:
            raise ValueError(f"ShardWriter: tensor {key!r} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._keys.add(key)
        self._buffer[key] = tensor.contiguous()
        self._buffer_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        path = self.out_dir / f".shard-{len(self._parts) + 1:05d}.safetensors.part"
        write_safetensors(self._buffer, path, {"format": "pt"})
        self._parts.append((path, list(self._buffer)))
        self._buffer, self._buffer_bytes = {}, 0

    def close(self) -> dict[str, str]:
        """Write the last shard, give every shard its final name, write the index; returns key -> file name.

        Raises
        ------
        ValueError
            If no tensor was added.
        """
        if self._buffer:
            self._flush()
        if not self._parts:
            raise ValueError(f"ShardWriter({self.out_dir}): no tensors to write")
        weight_map: dict[str, str] = {}
        count = len(self._parts)
        for i, (path, keys) in enumerate(self._parts, start=1):
            name = "model.safetensors" if count == 1 else f"model-{i:05d}-of-{count:05d}.safetensors"
            path.rename(self.out_dir / name)
            weight_map.update(dict.fromkeys(keys, name))
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        logger.info("wrote %d tensors in %d shard(s) to %s", len(weight_map), count, self.out_dir)
        return weight_map
