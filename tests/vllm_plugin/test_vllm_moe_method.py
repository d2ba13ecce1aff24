"""SamoyedsMoEMethod without an engine: weight loading (TP, EP, gate/up halves), completeness, validation, apply."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from samoyeds_vllm.formats import PackedWeight, pack, unpack
from samoyeds_vllm.pruning import magnitude_scores, select_mask
from samoyeds_vllm.vllm_plugin import moe as moe_module
from samoyeds_vllm.vllm_plugin.config import SamoyedsConfig
from samoyeds_vllm.vllm_plugin.moe import SamoyedsMoEMethod, packed_shapes, slice_packed_tensor

E, H, I = 8, 128, 128  # noqa: E741  (experts, hidden, intermediate before TP: the DESIGN.md names)
PATTERNS = ["1:2:32+2:4", "2:4"]
SHARDS = {"w1": "w13", "w3": "w13", "w2": "w2"}


class FakeExperts(torch.nn.Module):
    """The attributes of vLLM's RoutedExperts that the method reads (names, optional EP map)."""

    def __init__(self, expert_map: torch.Tensor | None = None) -> None:
        super().__init__()
        self.layer_name = "model.layers.0.mlp.experts"
        self.ckpt_gate_proj_name, self.ckpt_up_proj_name, self.ckpt_down_proj_name = "w1", "w3", "w2"
        self.expert_map = expert_map


def _checkpoint(pattern: str, seed: int = 0) -> dict[tuple[int, str], PackedWeight]:
    """Packed per-expert weights as a checkpoint holds them: (expert, w1|w3|w2) -> PackedWeight."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for e in range(E):
        for shard, shape in (("w1", (I, H)), ("w3", (I, H)), ("w2", (H, I))):
            w = torch.randn(shape, generator=gen) * 0.1
            out[e, shard] = pack(w, select_mask(magnitude_scores(w), pattern), pattern)
    return out


def _layer(pattern: str, tp_size: int = 1, tp_rank: int = 0, expert_map=None, num_local=E, activation="silu"):
    moe = SimpleNamespace(activation=activation, is_act_and_mul=True, tp_size=tp_size, tp_rank=tp_rank)
    method = SamoyedsMoEMethod(SamoyedsConfig(pattern), moe)
    layer = FakeExperts(expert_map)
    method.create_weights(layer, num_local, H, I // tp_size, torch.float32)
    return method, layer


def _load(layer, ckpt, skip=(), order_seed: int = 0) -> list[bool]:
    """Feed every checkpoint tensor through the params' weight_loader in a shuffled order."""
    items = [(e, shard, suffix, t) for (e, shard), pw in ckpt.items() for suffix, t in pw.tensors().items()]
    random.Random(order_seed).shuffle(items)
    results = []
    for e, shard, suffix, tensor in items:
        if (e, shard, suffix) in skip:
            continue
        param = getattr(layer, f"{SHARDS[shard]}_{suffix}")
        name = f"{layer.layer_name}.{SHARDS[shard]}_{suffix}"
        results.append(param.weight_loader(param, tensor.clone(), name, shard, e, return_success=True))
    return results


def _routing(tokens: int = 11, k: int = 2, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, H, generator=gen)
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(tokens)]).to(torch.int32)
    weights = torch.softmax(torch.randn(tokens, k, generator=gen), -1)
    return x, weights, ids


def _dense_moe(ckpt, x, weights, ids) -> torch.Tensor:
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gate, up, down = (unpack(ckpt[e, s]) for s in ("w1", "w3", "w2"))
            out[t] += weights[t, j] * (down @ (torch.nn.functional.silu(gate @ x[t]) * (up @ x[t])))
    return out


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("tp_size", [1, 2])
def test_tp_loading_equals_packed_weight_slicing(pattern, tp_size):
    ckpt = _checkpoint(pattern)
    inter = I // tp_size
    for rank in range(tp_size):
        method, layer = _layer(pattern, tp_size, rank)
        assert all(_load(layer, ckpt))
        method.process_weights_after_loading(layer)
        rows, cols = (rank * inter, (rank + 1) * inter), (rank * inter, (rank + 1) * inter)
        for e in range(E):
            gate = ckpt[e, "w1"].slice_out_features(*rows).tensors()
            up = ckpt[e, "w3"].slice_out_features(*rows).tensors()
            down = ckpt[e, "w2"].slice_in_features(*cols).tensors()
            for suffix in gate:
                expected_w13 = torch.cat([gate[suffix], up[suffix]], dim=0)
                assert torch.equal(getattr(layer, f"w13_{suffix}")[e], expected_w13), (e, suffix)
                assert torch.equal(getattr(layer, f"w2_{suffix}")[e], down[suffix]), (e, suffix)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_tp_partial_sums_add_up_to_the_dense_moe(pattern):
    ckpt = _checkpoint(pattern)
    x, weights, ids = _routing()
    partial = []
    for rank in range(2):
        method, layer = _layer(pattern, 2, rank)
        _load(layer, ckpt)
        method.process_weights_after_loading(layer)
        partial.append(method.apply(layer, x, weights, ids, None, None))
    torch.testing.assert_close(partial[0] + partial[1], _dense_moe(ckpt, x, weights, ids), rtol=1e-4, atol=1e-5)


def test_ep_loads_only_local_experts_and_partial_sums_add_up():
    pattern = "1:2:32+2:4"
    ckpt = _checkpoint(pattern)
    x, weights, ids = _routing()
    partial = []
    for rank in range(2):
        expert_map = torch.full((E,), -1, dtype=torch.int32)
        owned = list(range(rank, E, 2))  # round-robin placement: rank r owns experts r, r+2, ...
        expert_map[owned] = torch.arange(len(owned), dtype=torch.int32)
        method, layer = _layer(pattern, expert_map=expert_map, num_local=len(owned))
        results = _load(layer, ckpt)
        assert sum(results) == len(results) // 2  # the other rank's experts are skipped, not loaded
        method.process_weights_after_loading(layer)
        for local, e in enumerate(owned):
            assert torch.equal(layer.w2_sp_values[local], ckpt[e, "w2"].values)
            assert torch.equal(layer.w13_sp_meta[local, : I // 2], ckpt[e, "w1"].meta)
        partial.append(method.apply(layer, x, weights, ids, None, None))
    torch.testing.assert_close(partial[0] + partial[1], _dense_moe(ckpt, x, weights, ids), rtol=1e-4, atol=1e-5)


def test_missing_tensor_names_layer_expert_and_tensor():
    ckpt = _checkpoint("1:2:32+2:4")
    method, layer = _layer("1:2:32+2:4")
    _load(layer, ckpt, skip={(3, "w3", "sp_meta")})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts\.3\.w3\.sp_meta"):
        method.process_weights_after_loading(layer)


def test_missing_tensor_under_ep_names_the_global_expert():
    ckpt = _checkpoint("2:4")
    expert_map = torch.tensor([-1, -1, -1, -1, 0, 1, 2, 3], dtype=torch.int32)
    method, layer = _layer("2:4", expert_map=expert_map, num_local=4)
    _load(layer, ckpt, skip={(6, "w2", "sp_values")})
    with pytest.raises(ValueError, match=r"experts\.6\.w2\.sp_values"):
        method.process_weights_after_loading(layer)


@pytest.mark.parametrize(
    ("shard", "suffix", "bad", "match"),
    [
        ("w1", "sp_values", torch.zeros(I // 2, H // 2 + 1), r"experts\.2\.w1\.sp_values: expected shape"),
        ("w2", "sp_meta", torch.zeros(H // 2, I // 8 - 1, dtype=torch.uint8), r"experts\.2\.w2\.sp_meta: expected"),
        ("w3", "sp_rowsel", torch.zeros(I // 2, H // 32, dtype=torch.int64), r"experts\.2\.w3\.sp_rowsel: .*uint8"),
    ],
)
def test_misshaped_or_mistyped_tensor_fails_in_the_loader(shard, suffix, bad, match):
    _method, layer = _layer("1:2:32+2:4")
    param = getattr(layer, f"{SHARDS[shard]}_{suffix}")
    with pytest.raises(ValueError, match=match):
        param.weight_loader(param, bad, "name", shard, 2, return_success=True)


@pytest.mark.parametrize(("shard", "expert"), [("w1", 5), ("w3", 0), ("w2", 7)])
def test_corrupted_meta_fails_after_loading_naming_the_tensor(shard, expert):
    ckpt = _checkpoint("1:2:32+2:4")
    broken = ckpt[expert, shard].meta.clone()
    broken[1, 2] = 0x00  # positions (0, 0): not strictly ascending
    ckpt[expert, shard] = PackedWeight(ckpt[expert, shard].pattern, ckpt[expert, shard].values, broken,
                                       ckpt[expert, shard].rowsel)  # fmt: skip
    method, layer = _layer("1:2:32+2:4")
    _load(layer, ckpt)
    with pytest.raises(ValueError, match=rf"experts\.{expert}\.{shard}\.sp_meta: group"):
        method.process_weights_after_loading(layer)


def test_rowsel_out_of_range_fails_after_loading():
    ckpt = _checkpoint("1:2:32+2:4")
    bad = ckpt[4, "w2"].rowsel.clone()
    bad[0, 0] = 7
    ckpt[4, "w2"] = PackedWeight(ckpt[4, "w2"].pattern, ckpt[4, "w2"].values, ckpt[4, "w2"].meta, bad)
    method, layer = _layer("1:2:32+2:4")
    _load(layer, ckpt)
    with pytest.raises(ValueError, match=r"experts\.4\.w2\.sp_rowsel: value 7"):
        method.process_weights_after_loading(layer)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_dummy_load_yields_valid_metadata(pattern, monkeypatch):
    monkeypatch.setattr(moe_module, "load_format", lambda: "dummy")
    method, layer = _layer(pattern)
    assert layer.w13_sp_meta.dummy_weight_value == 0x44  # vLLM >= 0.32's dummy loader fills this value
    layer.w13_sp_meta.data.fill_(0xFF)  # what an uninitialised uint8 tensor may hold
    layer.w13_sp_values.data.uniform_(-1e-3, 1e-3)
    layer.w2_sp_values.data.uniform_(-1e-3, 1e-3)
    method.process_weights_after_loading(layer)  # no tensors were loaded; must neither raise nor leave garbage
    x, weights, ids = _routing()
    assert torch.isfinite(method.apply(layer, x, weights, ids, None, None)).all()


def test_create_weights_rejects_tp_splits_that_cut_chunks():
    moe = SimpleNamespace(activation="silu", is_act_and_mul=True, tp_size=4, tp_rank=0)
    method = SamoyedsMoEMethod(SamoyedsConfig("1:2:64+2:4"), moe)
    with pytest.raises(ValueError, match=r"I=32 .*TP size 4.*multiple of V=64"):
        method.create_weights(FakeExperts(), E, H, 32, torch.float32)


def test_create_weights_rejects_non_swiglu_activation():
    with pytest.raises(ValueError, match="SwiGLU"):
        _layer("2:4", activation="gelu")


@pytest.mark.parametrize(
    ("pattern", "suffix"),
    [("1:2:32+2:4", "sp_values"), ("1:2:32+2:4", "sp_meta"), ("1:2:32+2:4", "sp_rowsel"), ("2:4", "sp_meta")],
)
def test_slice_packed_tensor_matches_packed_weight_slicing(pattern, suffix):
    pw = _checkpoint(pattern)[0, "w1"]
    tensor = pw.tensors()[suffix]
    assert tuple(tensor.shape) == packed_shapes(pw.pattern, I, H)[suffix]
    got = slice_packed_tensor(pw.pattern, suffix, tensor, I, H, rows=(64, 128), cols=(32, 96))
    assert torch.equal(got, pw.slice_out_features(64, 128).slice_in_features(32, 96).tensors()[suffix])
    with pytest.raises(ValueError, match="whole"):
        slice_packed_tensor(pw.pattern, suffix, tensor, I, H, cols=(4, 100))
