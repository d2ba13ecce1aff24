import pytest

from samoyeds_vllm.formats import SUPPORTED_CHUNKS, PatternKind, SparsityPattern, parse_pattern


@pytest.mark.parametrize("text", ["2:4", " 2:4 ", *[f"1:2:{v}+2:4" for v in SUPPORTED_CHUNKS]])
def test_parse_round_trips_the_canonical_spelling(text):
    pattern = parse_pattern(text)
    assert str(pattern) == text.strip()
    assert parse_pattern(str(pattern)) == pattern


def test_parse_fields():
    assert parse_pattern("2:4") == SparsityPattern(PatternKind.TWO_FOUR, 0)
    p = parse_pattern("1:2:128+2:4")
    assert p.kind is PatternKind.SAMOYEDS and p.chunk == 128 and p.row_group == 2
    assert p.density == 0.25 and parse_pattern("2:4").density == 0.5


@pytest.mark.parametrize("text", ["", "4:8", "1:2:16+2:4", "1:2:100+2:4", "1:2:128", "2:4+1:2:128", "dense"])
def test_parse_rejects_unknown_patterns(text):
    with pytest.raises(ValueError, match=r"unknown sparsity pattern|needs V in"):
        parse_pattern(text)


def test_parse_rejects_non_strings():
    with pytest.raises(TypeError, match="pattern must be a string"):
        parse_pattern(24)


@pytest.mark.parametrize(
    ("pattern", "shape", "message"),
    [
        ("2:4", (16, 12), "multiple of 8"),
        ("1:2:128+2:4", (16, 1400), "I=1400.*I % V = 120"),
        ("1:2:256+2:4", (16, 1408), "I % V = 128"),
        ("1:2:32+2:4", (15, 64), "O must be even"),
        ("2:4", (0, 64), "non-empty"),
    ],
)
def test_check_shape_names_the_problem(pattern, shape, message):
    with pytest.raises(ValueError, match=message):
        parse_pattern(pattern).check_shape(*shape, name="w2")


@pytest.mark.parametrize(
    ("pattern", "bf16_bytes"),
    [("2:4", 1.125), ("1:2:32+2:4", 0.5 + 0.0625 + 1 / 64), ("1:2:128+2:4", 0.5 + 0.0625 + 1 / 256)],
)
def test_bytes_per_weight(pattern, bf16_bytes):
    assert parse_pattern(pattern).bytes_per_weight(2) == pytest.approx(bf16_bytes)
