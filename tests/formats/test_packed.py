"""Round trips, validation and tensor-parallel slicing of the canonical packed layout."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from samoyeds_vllm.formats import (
    SUPPORTED_CHUNKS,
    VALUE_DTYPES,
    PackedWeight,
    pack,
    packed_shapes,
    parse_pattern,
    unpack,
    validate,
)
from samoyeds_vllm.pruning import select_mask

PATTERNS = ["2:4", *[f"1:2:{v}+2:4" for v in SUPPORTED_CHUNKS]]


@st.composite
def weight_and_mask(draw, patterns=PATTERNS, max_lead=2):
    """A random weight and a random (not score-optimal) mask satisfying the pattern."""
    pattern = parse_pattern(draw(st.sampled_from(patterns)))
    dtype = draw(st.sampled_from(VALUE_DTYPES))
    lead = tuple(draw(st.lists(st.integers(1, 3), max_size=max_lead)))
    n_out = pattern.row_group * draw(st.integers(1, 9))
    n_in = pattern.col_multiple * draw(st.integers(1, 3 if pattern.is_samoyeds else 9))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(*lead, n_out, n_in, generator=gen).to(dtype)
    weight[weight == 0] = 1.0  # zeros would make "kept" ambiguous in the assertions below
    # Random scores give random legal masks; random dropping leaves groups with 0 or 1 kept entries too.
    mask = select_mask(torch.rand(weight.shape, generator=gen), pattern)
    mask &= torch.rand(weight.shape, generator=gen) < draw(st.sampled_from([1.0, 0.7, 0.0]))
    return pattern, weight, mask


@given(weight_and_mask())
def test_unpack_of_pack_is_the_masked_weight(case):
    pattern, weight, mask = case
    packed = pack(weight, mask, pattern)
    validate(packed)
    dense = unpack(packed)
    assert dense.dtype == weight.dtype and dense.shape == weight.shape
    assert torch.equal(dense, torch.where(mask, weight, torch.zeros((), dtype=weight.dtype)))
    assert packed.dense_shape == tuple(weight.shape)


@given(weight_and_mask())
def test_pack_of_unpack_is_bitwise_stable(case):
    pattern, weight, mask = case
    packed = pack(weight, mask, pattern)
    again = pack(unpack(packed), mask, pattern)
    for name, t in packed.tensors().items():
        assert torch.equal(t, again.tensors()[name]), name


@given(weight_and_mask())
def test_exact_byte_count(case):
    pattern, weight, mask = case
    packed = pack(weight, mask, pattern)
    expected = weight.numel() * pattern.bytes_per_weight(weight.element_size())
    assert packed.nbytes == expected
    assert set(packed.tensors()) == (
        {"sp_values", "sp_meta", "sp_rowsel"} if pattern.is_samoyeds else {"sp_values", "sp_meta"}
    )


def test_layout_matches_the_documented_bits():
    """docs/FORMAT.md example: one row, I = 8, kept positions (1, 3) and (0, 2)."""
    weight = torch.arange(1, 9, dtype=torch.float32)[None]
    mask = torch.tensor([[0, 1, 0, 1, 1, 0, 1, 0]], dtype=torch.bool)
    packed = pack(weight, mask, "2:4")
    assert packed.values.tolist() == [[2.0, 4.0, 5.0, 7.0]]
    # group 0: p0=1, p1=3 -> nibble 1 | 3 << 2 = 13; group 1: p0=0, p1=2 -> 8; byte = 13 | 8 << 4
    assert packed.meta.tolist() == [[13 | 8 << 4]]


def test_samoyeds_layout_matches_the_documented_selection():
    weight = torch.randn(2, 64)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[1, :32:2] = True  # chunk 0 owned by row 1
    mask[0, 33:64:2] = True  # chunk 1 owned by row 0
    packed = pack(weight, mask, "1:2:32+2:4")
    assert packed.rowsel.tolist() == [[1, 0]]
    assert torch.equal(packed.values[0, :16], weight[1, :32:2])
    assert torch.equal(packed.values[0, 16:], weight[0, 33:64:2])


def test_groups_with_fewer_than_two_kept_pad_with_lowest_free_positions():
    weight = torch.ones(1, 8)
    mask = torch.tensor([[0, 0, 1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    packed = pack(weight, mask, "2:4")
    # group 0 keeps position 2 and pads with 0 -> (0, 2); group 1 keeps nothing -> (0, 1)
    assert packed.meta.tolist() == [[(0 | 2 << 2) | (0 | 1 << 2) << 4]]
    assert packed.values.tolist() == [[0.0, 1.0, 0.0, 0.0]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.int8, torch.float8_e4m3fn])
def test_pack_rejects_unsupported_dtypes(dtype):
    w = torch.ones(4, 8).to(dtype)
    with pytest.raises(TypeError, match="not supported"):
        pack(w, torch.ones(4, 8, dtype=torch.bool), "2:4")


def test_pack_rejects_masks_that_break_the_pattern():
    w = torch.randn(4, 16)
    mask = select_mask(w.abs(), "2:4")
    mask[2, 9] = mask[2, 10] = mask[2, 11] = mask[2, 8] = True
    with pytest.raises(ValueError, match=r"breaks 2:4 at index \(2, 8\)"):
        pack(w, mask, "2:4")
    w = torch.randn(4, 64)
    mask = select_mask(w.abs(), "1:2:32+2:4")
    mask[2:4, 40] = True
    with pytest.raises(ValueError, match=r"rows 2 and 3 both keep entries in chunk \[32, 64\)"):
        pack(w, mask, "1:2:32+2:4")


@pytest.mark.parametrize(
    ("pattern", "shape", "message"),
    [("1:2:128+2:4", (8, 1400), "I=1400"), ("1:2:32+2:4", (7, 64), "O must be even"), ("2:4", (4, 20), "of 8")],
)
def test_pack_rejects_illegal_shapes(pattern, shape, message):
    with pytest.raises(ValueError, match=message):
        pack(torch.zeros(shape), torch.zeros(shape, dtype=torch.bool), pattern)


def _packed(pattern="1:2:32+2:4", shape=(3, 8, 64)):
    w = torch.randn(shape)
    return pack(w, select_mask(w.abs(), pattern), pattern)


def test_validate_rejects_non_ascending_positions_naming_the_first():
    p = _packed()
    meta = p.meta.clone()
    meta[1, 2, 3] = (3 | 1 << 2) << 4 | (0 | 1 << 2)  # group 7 of row (1, 2): positions (3, 1)
    meta[2, 0, 0] = 0  # a later bad group: (0, 0)
    with pytest.raises(ValueError, match=r"w13\.sp_meta: group 7 of row \(1, 2\).*\(3, 1\)"):
        validate(PackedWeight(p.pattern, p.values, meta, p.rowsel), name="w13")


def test_validate_rejects_duplicate_positions():
    p = _packed("2:4", (4, 16))
    meta = p.meta.clone()
    meta[3, 1] = (2 | 2 << 2) | (0 | 1 << 2) << 4
    with pytest.raises(ValueError, match=r"group 2 of row \(3,\).*\(2, 2\)"):
        validate(PackedWeight(p.pattern, p.values, meta), name="w")


def test_validate_rejects_bad_row_selection():
    p = _packed()
    rowsel = p.rowsel.clone()
    rowsel[2, 3, 1] = 2
    with pytest.raises(ValueError, match=r"w2\.sp_rowsel: value 2 at index \(2, 3, 1\)"):
        validate(PackedWeight(p.pattern, p.values, p.meta, rowsel), name="w2")


@pytest.mark.parametrize(
    ("mutate", "error", "message"),
    [
        (lambda p: PackedWeight(p.pattern, p.values, p.meta[..., :-1], p.rowsel), ValueError, r"sp_meta: expected"),
        (lambda p: PackedWeight(p.pattern, p.values, p.meta.int(), p.rowsel), TypeError, r"sp_meta: dtype"),
        (lambda p: PackedWeight(p.pattern, p.values.double(), p.meta, p.rowsel), TypeError, r"sp_values: dtype"),
        (lambda p: PackedWeight(p.pattern, p.values, p.meta, None), ValueError, r"sp_rowsel: required"),
        (lambda p: PackedWeight(p.pattern, p.values, p.meta, p.rowsel[..., :1]), ValueError, r"sp_rowsel: expected"),
        (lambda p: PackedWeight(p.pattern, p.values, p.meta, p.rowsel.int()), TypeError, r"sp_rowsel: dtype"),
        (
            lambda p: PackedWeight(parse_pattern("2:4"), p.values, p.meta, p.rowsel),
            ValueError,
            r"2:4 has no row selection",
        ),
        (
            lambda p: PackedWeight(parse_pattern("1:2:64+2:4"), p.values[..., :8], p.meta[..., :2], p.rowsel),
            ValueError,
            r"I=16",
        ),
    ],
)
def test_validate_rejects_malformed_tensors(mutate, error, message):
    with pytest.raises(error, match=message):
        validate(mutate(_packed()))


def test_from_tensors_names_missing_tensors():
    p = _packed()
    with pytest.raises(ValueError, match=r"layers\.0\.experts\.3\.w1: .*missing \['sp_rowsel'\]"):
        PackedWeight.from_tensors("1:2:32+2:4", {"sp_values": p.values, "sp_meta": p.meta}, "layers.0.experts.3.w1")
    again = PackedWeight.from_tensors("1:2:32+2:4", p.tensors())
    assert torch.equal(unpack(again), unpack(p))


@given(weight_and_mask(max_lead=1), st.data())
def test_slicing_out_features_commutes_with_unpack(case, data):
    pattern, weight, mask = case
    packed = pack(weight, mask, pattern)
    g, n_out = pattern.row_group, weight.shape[-2]
    start = g * data.draw(st.integers(0, n_out // g - 1))
    stop = g * data.draw(st.integers(start // g + 1, n_out // g))
    sliced = packed.slice_out_features(start, stop)
    validate(sliced)
    assert torch.equal(unpack(sliced), unpack(packed)[..., start:stop, :])


@given(weight_and_mask(max_lead=1), st.data())
def test_slicing_in_features_commutes_with_unpack(case, data):
    pattern, weight, mask = case
    packed = pack(weight, mask, pattern)
    m, n_in = pattern.col_multiple, weight.shape[-1]
    start = m * data.draw(st.integers(0, n_in // m - 1))
    stop = m * data.draw(st.integers(start // m + 1, n_in // m))
    sliced = packed.slice_in_features(start, stop)
    validate(sliced)
    assert torch.equal(unpack(sliced), unpack(packed)[..., start:stop])


def test_tensor_parallel_shards_reassemble():
    """TP=2: shards of w13 (along O) and w2 (along I) are plain slices that concatenate back."""
    w13, w2 = _packed(shape=(2, 128, 64)), _packed(shape=(2, 64, 128))
    shards13 = [w13.slice_out_features(r * 64, (r + 1) * 64) for r in range(2)]
    shards2 = [w2.slice_in_features(r * 64, (r + 1) * 64) for r in range(2)]
    assert torch.equal(torch.cat([unpack(s) for s in shards13], dim=-2), unpack(w13))
    assert torch.equal(torch.cat([unpack(s) for s in shards2], dim=-1), unpack(w2))
    for s in shards13 + shards2:
        assert s.values._base is not None and s.meta._base is not None  # views, no copies


@pytest.mark.parametrize(
    ("method", "args", "message"),
    [
        ("slice_out_features", (1, 8), "whole row pairs"),
        ("slice_out_features", (0, 9), "outside"),
        ("slice_in_features", (16, 64), "blocks of 32"),
        ("slice_in_features", (32, 32), "outside"),
    ],
)
def test_slicing_rejects_cuts_through_the_pattern(method, args, message):
    with pytest.raises(ValueError, match=message):
        getattr(_packed(), method)(*args)


@given(weight_and_mask())
def test_packed_shapes_predicts_the_packed_tensors(case):
    pattern, weight, mask = case
    packed = pack(weight, mask, pattern)
    *lead, n_out, n_in = weight.shape
    expected = packed_shapes(pattern, n_out, n_in, tuple(lead))
    assert {name: tuple(t.shape) for name, t in packed.tensors().items()} == expected
