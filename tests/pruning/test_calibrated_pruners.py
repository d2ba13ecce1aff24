"""pruning.wanda and pruning.sparsegpt: legal masks, and less output error than magnitude on held-out tokens."""

from __future__ import annotations

import pytest
import torch

from samoyeds_vllm.formats import pack, parse_pattern, unpack
from samoyeds_vllm.pruning import magnitude_scores, select_mask, sparsegpt_prune, wanda_scores

PATTERNS = ["2:4", "1:2:32+2:4", "1:2:64+2:4"]


def _inputs(tokens: int, n_in: int, seed: int) -> torch.Tensor:
    """Activations with a few large-scale channels and correlated features, like LLM hidden states."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.exp(torch.randn(n_in, generator=torch.Generator().manual_seed(99)) * 0.8)
    mixing = torch.eye(n_in) + torch.randn(n_in, n_in, generator=torch.Generator().manual_seed(98)) / n_in**0.5
    return (torch.randn(tokens, n_in, generator=gen) @ mixing) * scales


def _output_error(weight: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    return ((x @ (weight - pruned).T).norm() / (x @ weight.T).norm()).item()


@pytest.mark.parametrize("pattern", PATTERNS)
def test_wanda_and_sparsegpt_beat_magnitude_on_held_out_tokens(pattern: str) -> None:
    n_out, n_in = 96, 256
    weight = torch.randn(n_out, n_in, generator=torch.Generator().manual_seed(1))
    calib, held_out = _inputs(1024, n_in, seed=2), _inputs(512, n_in, seed=3)

    magnitude = weight * select_mask(magnitude_scores(weight), pattern)
    wanda = weight * select_mask(wanda_scores(weight, (calib**2).sum(0)), pattern)
    sgpt, mask = sparsegpt_prune(weight, calib.T @ calib, pattern)

    errors = {name: _output_error(weight, w, held_out) for name, w in [("mag", magnitude), ("wanda", wanda)]}
    errors["sparsegpt"] = _output_error(weight, sgpt, held_out)
    assert errors["wanda"] < 0.9 * errors["mag"], errors
    assert errors["sparsegpt"] < 0.97 * errors["wanda"], errors
    # the SparseGPT result is exactly representable in the pattern
    packed = pack(sgpt, mask, pattern)
    assert torch.equal(unpack(packed), sgpt)
    assert mask.float().mean().item() == pytest.approx(parse_pattern(pattern).density)


def test_sparsegpt_dead_channels_and_dtype() -> None:
    weight = torch.randn(16, 64, dtype=torch.bfloat16)
    x = torch.randn(200, 64)
    x[:, :8] = 0.0  # channels never active
    pruned, mask = sparsegpt_prune(weight, x.T @ x, "2:4", block_size=16)
    assert pruned.dtype == torch.bfloat16
    assert not pruned[:, :8].any()  # a dead channel's weight carries nothing: zeroed whatever the mask holds
    assert not (pruned != 0)[~mask].any()


def test_sparsegpt_block_size_does_not_change_the_result() -> None:
    weight = torch.randn(32, 128, dtype=torch.float64).float()
    x = torch.randn(300, 128)
    a, mask_a = sparsegpt_prune(weight, x.T @ x, "1:2:32+2:4", block_size=32)
    b, mask_b = sparsegpt_prune(weight, x.T @ x, "1:2:32+2:4", block_size=128)
    assert torch.equal(mask_a, mask_b)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_input_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="input_sq_sum must be"):
        wanda_scores(torch.randn(4, 16), torch.ones(8))
    with pytest.raises(ValueError, match="hessian must be"):
        sparsegpt_prune(torch.randn(4, 16), torch.eye(8), "2:4")
    with pytest.raises(ValueError, match="multiple of V=32"):
        sparsegpt_prune(torch.randn(4, 48), torch.eye(48), "1:2:32+2:4")
