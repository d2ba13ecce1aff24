"""samoyeds-convert --synthetic: random sparse checkpoints that validate, shard and load, without dense weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures import build_tiny_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import samoyeds_vllm  # noqa: F401  (registers the "samoyeds" quantization method)
from samoyeds_vllm.convert.cli import main
from samoyeds_vllm.convert.synthetic import random_packed
from samoyeds_vllm.formats import PackedWeight, unpack, validate


def _config(arch: str, path: Path) -> Path:
    config = build_tiny_model(arch).config.to_dict()
    config.pop("dtype", None)
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(("arch", "pattern"), [("qwen3_moe", "1:2:32+2:4"), ("mixtral", "2:4")])
def test_synthetic_checkpoint_validates_and_loads(tmp_path: Path, arch: str, pattern: str) -> None:
    out = tmp_path / "synthetic"
    args = ["--synthetic", str(_config(arch, tmp_path / "config.json")), str(out), "--pattern", pattern]
    assert main([*args, "--dtype", "fp32", "--max-shard-size", "300KB", "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == json.loads((tmp_path / "config.json").read_text())["architectures"]
    assert config["quantization_config"]["pattern"] == pattern
    assert config["quantization_config"]["pruning"]["method"] == "synthetic"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = {k: v for f in set(index["weight_map"].values()) for k, v in load_file(out / f).items()}
    assert set(index["weight_map"]) == set(tensors)
    suffixes = ("sp_values", "sp_meta", "sp_rowsel") if pattern != "2:4" else ("sp_values", "sp_meta")
    stems = {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".sp_values")}
    assert len(stems) == 2 * 8 * 3 and not any(".experts." in k and k.endswith(".weight") for k in tensors)
    for stem in stems:
        validate(PackedWeight.from_tensors(pattern, {s: tensors[f"{stem}.{s}"] for s in suffixes}, stem), stem)

    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("hello sparse experts", return_tensors="pt").input_ids
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_random_packed_density_and_rowsel() -> None:
    packed = random_packed(64, 256, "1:2:64+2:4", torch.bfloat16, torch.Generator().manual_seed(0), std=0.1)
    validate(packed, "random")
    dense = unpack(packed)
    assert dense.shape == (64, 256) and (dense != 0).float().mean().item() == pytest.approx(0.25, abs=0.01)
    assert 0 < packed.rowsel.float().mean().item() < 1


def test_synthetic_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model_type": "qwen3_moe"}))
    assert main(["--synthetic", str(bad), str(tmp_path / "o"), "--pattern", "2:4"]) == 2
    assert "needs 'model_type' and 'architectures'" in capsys.readouterr().err
    config = _config("olmoe", tmp_path / "config.json")
    assert main(["--synthetic", str(config), str(tmp_path / "o"), "--pattern", "1:2:256+2:4"]) == 2
    assert "V=256" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
