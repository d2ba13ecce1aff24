"""Transformers on a GPU: the samoyeds experts run the CUDA kernels and are as accurate as dense bf16."""

from __future__ import annotations

import pytest
import torch
from fixtures import write_tiny_checkpoint
from transformers import AutoModelForCausalLM

import samoyeds_vllm  # noqa: F401  (registers the "samoyeds" quantization method)
from samoyeds_vllm.hf import SamoyedsExperts
from samoyeds_vllm.ops.cuda_kernels import cuda_kernels_available

pytestmark = pytest.mark.gpu


def _logits(path, dtype, ids):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="cuda").eval()
    with torch.no_grad():
        return model, model(ids).logits.float()


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "deepseek_v2"])
@pytest.mark.parametrize("pattern", ["2:4", "1:2:32+2:4"])
def test_bf16_model_on_gpu_runs_kernels_and_matches_dense(tmp_path, arch, pattern):
    """Ground truth: the dense masked model in fp32. The samoyeds model in bf16 (CUDA kernels) must be about
    as close to it as the dense masked model in bf16 (stock Transformers) is."""
    assert cuda_kernels_available()
    sparse = write_tiny_checkpoint(arch, tmp_path / "sparse", pattern, seed=3, dense_masked_dir=tmp_path / "dense")
    ids = torch.randint(4, 500, (2, 17), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    model, got = _logits(sparse, torch.bfloat16, ids)
    _, dense_bf16 = _logits(tmp_path / "dense", torch.bfloat16, ids)
    _, truth = _logits(tmp_path / "dense", torch.float32, ids)
    experts = [m for m in model.modules() if isinstance(m, SamoyedsExperts)]
    assert experts and all(m.kernel_layout for m in experts), "experts did not switch to the CUDA kernel layout"
    assert not torch.isnan(got).any()
    ours = ((got - truth).norm() / truth.norm()).item()
    stock = ((dense_bf16 - truth).norm() / truth.norm()).item()
    assert ours < 2 * stock + 5e-3, f"samoyeds bf16 logit error {ours:.3e} vs dense bf16 {stock:.3e}"
