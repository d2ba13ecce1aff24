"""convert.calibration: calibrated conversions beat magnitude end to end; calibration text loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures import build_tiny_model, write_tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

import samoyeds_vllm  # noqa: F401  (registers the "samoyeds" quantization method)
from samoyeds_vllm.convert.calibration import load_calibration_tokens
from samoyeds_vllm.convert.cli import main

_TEXT = (
    "the quick brown fox jumps over the lazy dog a sparse mixture of experts routes every token to a few experts "
    "each expert is a small feed forward network hello world how are you today one two three four five six seven"
)
_WORDS = _TEXT.split(" ")


def _text(count: int, gen: torch.Generator) -> str:
    return " ".join(_WORDS[j] for j in torch.randint(len(_WORDS), (count,), generator=gen))


def _moe_output_of_layer0(path: Path, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    captured = []
    model.model.layers[0].mlp.register_forward_hook(lambda _m, _a, out: captured.append(out))
    with torch.no_grad():
        model(ids)
    return captured[0][0] if isinstance(captured[0], tuple) else captured[0]


def test_wanda_and_sparsegpt_beat_magnitude_on_a_moe_layer_for_held_out_tokens(tmp_path: Path) -> None:
    """Layer 0's MoE block sees the same inputs in every model (attention is dense), so its output error on
    held-out text measures the pruners alone."""
    dense = tmp_path / "dense"
    build_tiny_model("qwen3_moe", seed=1).save_pretrained(str(dense))
    write_tiny_tokenizer(dense)
    gen = torch.Generator().manual_seed(0)
    (tmp_path / "calib.txt").write_text(_text(3000, gen))
    ids = AutoTokenizer.from_pretrained(dense)(_text(400, gen), return_tensors="pt").input_ids[:, :256]
    reference = _moe_output_of_layer0(dense, ids)
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        args = [str(dense), str(tmp_path / method), "--pattern", "2:4", "--method", method, "--quiet"]
        if method != "magnitude":
            args += ["--calibration", str(tmp_path / "calib.txt"), "--num-calibration-samples", "16"]
            args += ["--calibration-seq-len", "128"]
        assert main(args) == 0
        out = _moe_output_of_layer0(tmp_path / method, ids)
        errors[method] = ((out - reference).norm() / reference.norm()).item()
    assert errors["wanda"] < 0.95 * errors["magnitude"], errors
    assert errors["sparsegpt"] < 0.8 * errors["magnitude"], errors
    assert errors["sparsegpt"] < errors["wanda"], errors


def test_calibration_tokens_from_txt_and_jsonl(tmp_path: Path) -> None:
    write_tiny_tokenizer(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    text = _text(300, torch.Generator().manual_seed(1))
    (tmp_path / "a.txt").write_text(text)
    tokens = load_calibration_tokens(tmp_path / "a.txt", tokenizer, num_samples=4, seq_len=16)
    assert tokens.shape == (4, 16) and tokens.dtype == torch.long
    assert tokens.flatten().tolist() == tokenizer(text, add_special_tokens=False)["input_ids"][:64]
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "hello world"}) + "\n\n" + json.dumps({"text": text}) + "\n")
    tokens = load_calibration_tokens(tmp_path / "b.jsonl", tokenizer, num_samples=1000, seq_len=32)
    assert tokens.shape[1] == 32 and 1 <= tokens.shape[0] < 1000
    assert tokenizer.eos_token_id in tokens[0].tolist()  # documents are joined with EOS
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"c\.jsonl:2: each line must be an object with a 'text' string"):
        load_calibration_tokens(tmp_path / "c.jsonl", tokenizer, 1, 8)


def test_calibration_materialises_one_decoder_layer_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from samoyeds_vllm.convert.calibration import LayerwiseCalibrator

    dense = tmp_path / "dense"
    build_tiny_model("mixtral", seed=2).save_pretrained(str(dense))
    write_tiny_tokenizer(dense)
    (tmp_path / "calib.txt").write_text(_text(500, torch.Generator().manual_seed(3)))
    seen = []
    real_forward = LayerwiseCalibrator._forward

    def checked_forward(self, layer):
        loaded = [i for i, m in enumerate(self.layers) if any(not p.is_meta for p in m.parameters())]
        seen.append(loaded)
        return real_forward(self, layer)

    monkeypatch.setattr(LayerwiseCalibrator, "_forward", checked_forward)
    args = [str(dense), str(tmp_path / "out"), "--pattern", "2:4", "--method", "wanda", "--quiet"]
    assert main([*args, "--calibration", str(tmp_path / "calib.txt"), "--calibration-seq-len", "32"]) == 0
    assert seen == [[0]] * 3 + [[1]] * 3  # three forwards per layer, only that layer loaded
