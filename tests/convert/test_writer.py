"""convert.writer and the tiny fixtures: files, config.json block, shards, tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures import write_tiny_checkpoint
from safetensors.torch import load_file
from transformers import AutoTokenizer

from samoyeds_vllm.convert import ShardWriter, write_checkpoint
from samoyeds_vllm.convert.writer import write_safetensors
from samoyeds_vllm.formats import PackedWeight


def test_tiny_checkpoint_files_and_config(tmp_path: Path) -> None:
    out = write_tiny_checkpoint("mixtral", tmp_path / "s", "1:2:32+2:4", dense_masked_dir=tmp_path / "d")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"]
    quant = config["quantization_config"]
    assert quant["quant_method"] == "samoyeds" and quant["format_version"] == 1
    assert quant["pattern"] == "1:2:32+2:4" and quant["targets"] == ["experts"] and quant["ignore"] == []
    assert quant["pruning"]["method"] == "magnitude"
    assert "quantization_config" not in json.loads((tmp_path / "d" / "config.json").read_text())
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).is_file() and (tmp_path / "d" / name).is_file()

    tensors = load_file(out / "model.safetensors")
    assert not any(k.endswith(".weight") and ".experts." in k for k in tensors)
    stem = "model.layers.0.block_sparse_moe.experts.7.w2"
    packed = PackedWeight.from_tensors(
        "1:2:32+2:4", {s: tensors[f"{stem}.{s}"] for s in ("sp_values", "sp_meta", "sp_rowsel")}, stem
    )
    assert packed.dense_shape == (128, 128)
    assert tensors[f"{stem}.sp_meta"].dtype == torch.uint8

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) <= config["vocab_size"]
    ids = tokenizer("hello sparse experts").input_ids
    assert tokenizer.decode(ids) == "hello sparse experts"
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 3)


def test_shards_and_index(tmp_path: Path) -> None:
    tensors = {f"t{i}": torch.full((256,), float(i)) for i in range(5)}
    write_checkpoint(tmp_path, tensors, {"architectures": ["X"]}, max_shard_bytes=2048)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == 3 and index["metadata"]["total_size"] == 5 * 1024
    loaded = {k: v for f in files for k, v in load_file(tmp_path / f).items()}
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_architectures_required(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="architectures"):
        write_checkpoint(tmp_path, {"t": torch.zeros(1)}, {"model_type": "mixtral"})


def test_streaming_safetensors_round_trip(tmp_path: Path) -> None:
    tensors = {
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "scalar": torch.tensor(2.5),
        "bool": torch.tensor([True, False, True]),
        "u8": torch.arange(7, dtype=torch.uint8),
        "empty": torch.zeros(0, 4),
        "strided": torch.arange(12.0).reshape(3, 4).T,
    }
    write_safetensors(tensors, tmp_path / "x.safetensors", {"format": "pt"})
    loaded = load_file(tmp_path / "x.safetensors")
    assert loaded.keys() == tensors.keys()
    for key, tensor in tensors.items():
        assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor), key


def test_shard_writer_names_and_duplicates(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, max_shard_bytes=1500)
    for i in range(4):
        writer.add(f"t{i}", torch.full((128,), float(i)))  # 512 B each: two per shard
    with pytest.raises(ValueError, match="written twice"):
        writer.add("t0", torch.zeros(1))
    weight_map = writer.close()
    assert sorted(set(weight_map.values())) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert not list(tmp_path.glob(".*"))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == weight_map and index["metadata"]["total_size"] == 4 * 512
