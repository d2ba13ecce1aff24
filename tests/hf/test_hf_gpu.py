"""Transformers on a GPU: the samoyeds experts run the CUDA kernels and match the dense masked model."""

from __future__ import annotations

import pytest
import torch
from fixtures import write_tiny_checkpoint
from transformers import AutoModelForCausalLM

import samoyeds_vllm  # noqa: F401  (registers the "samoyeds" quantization method)
from samoyeds_vllm.hf import SamoyedsExperts
from samoyeds_vllm.ops.cuda_kernels import cuda_kernels_available

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "deepseek_v2"])
@pytest.mark.parametrize("pattern", ["2:4", "1:2:32+2:4"])
def test_bf16_model_on_gpu_runs_kernels_and_matches_dense(tmp_path, arch, pattern):
    assert cuda_kernels_available()
    sparse = write_tiny_checkpoint(arch, tmp_path / "sparse", pattern, seed=3, dense_masked_dir=tmp_path / "dense")
    model = AutoModelForCausalLM.from_pretrained(sparse, dtype=torch.bfloat16, device_map="cuda").eval()
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.bfloat16, device_map="cuda").eval()
    ids = torch.randint(4, 500, (2, 17), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        got = model(ids).logits.float()
        want = dense(ids).logits.float()
    experts = [m for m in model.modules() if isinstance(m, SamoyedsExperts)]
    assert experts and all(m.kernel_layout for m in experts), "experts did not switch to the CUDA kernel layout"
    assert not torch.isnan(got).any()
    rel = (got - want).norm() / want.norm()
    assert rel < 3e-2, f"relative logit error {rel:.3e}"
    # greedy continuation agrees on the first tokens (bf16 end to end on both sides)
    assert (got[:, -1].argmax(-1) == want[:, -1].argmax(-1)).float().mean() >= 0.5
