"""The ``samoyeds-convert`` lifecycle: Resolve, Plan, Validate, Convert (orchestration only; math is in pruning/).

1. **Resolve** -- read ``SRC_DIR/config.json``, pick the architecture's expert layout (unsupported ones are refused,
   listing the supported), find the safetensors shards (with or without ``model.safetensors.index.json``) and read
   every tensor's name, shape and dtype from the shard headers (no data).
2. **Plan** -- decide per tensor: prune + pack (routed experts, shared experts when targeted), or copy (everything
   else, ignored experts); compute the exact output bytes.
3. **Validate** -- before anything is written: every pruned weight's shape tiles by the pattern and its dtype is
   bf16/fp16/fp32, ``--ignore`` patterns match something, calibration settings are complete, OUT_DIR is free.
4. **Convert** -- stream: magnitude reads shard by shard, tensor by tensor; Wanda and SparseGPT go decoder layer by
   decoder layer (``calibration``). Output shards are flushed as they fill (``writer.ShardWriter``), so peak memory
   is about one output shard plus one layer. Everything is written into a temporary directory beside OUT_DIR that
   is renamed to OUT_DIR only at the end; a failed or interrupted run removes it.

Source tensor -> output tensor (``W[O, I]``; ``R = O`` for 2:4, ``O/2`` for 1:2:V+2:4):

==========================================  =========================================================  ============
source                                      output                                                     how
==========================================  =========================================================  ============
``...experts.{e}.{proj}.weight [O, I]``,    ``...experts.{e}.{proj}.sp_values [R, I/2]``,              prune, pack
fused ``experts.gate_up_proj [E, 2I, H]``,  ``.sp_meta [R, I/8]`` uint8,
``experts.down_proj [E, H, I]``             ``.sp_rowsel [O/2, I/V]`` uint8 (1:2:V+2:4 only)
``...shared_expert(s).{proj}.weight``       the same suffixes (with ``--targets shared_experts`` only)  prune, pack
every other tensor, ignored experts         same key (``mlp`` -> ``block_sparse_moe`` for Mixtral)     copy
==========================================  =========================================================  ============
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import re
import shutil
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import __version__
from ..formats import SparsityPattern, pack, parse_pattern
from ..formats.packed import VALUE_DTYPES
from ..pruning import magnitude_scores, select_mask
from .architectures import ExpertLayout, get_layout
from .sparsify import build_quantization_config, canonical_key, check_expert_shapes, split_expert_tensors
from .writer import ShardWriter, copy_tokenizer_files, write_config_json

__all__ = [
    "DTYPES",
    "METHODS",
    "TARGETS",
    "CheckpointSource",
    "ConvertOptions",
    "ConvertPlan",
    "ConvertSummary",
    "TensorPlan",
    "atomic_output_dir",
    "convert",
    "parse_size",
    "plan",
    "resolve",
    "run",
    "validate",
]

logger = logging.getLogger(__name__)

#: ``--method`` choices.
METHODS: tuple[str, ...] = ("magnitude", "wanda", "sparsegpt")
#: ``--targets`` choices.
TARGETS: tuple[str, ...] = ("experts", "shared_experts")
#: ``--dtype`` choices.
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}

_LAYER_RE = re.compile(r"^(?P<prefix>(?:.+\.)?layers\.(?P<index>\d+))\.")

KIND_ROUTED = "routed experts (pruned)"
KIND_SHARED = "shared experts (pruned)"
KIND_IGNORED = "routed experts (ignored, dense)"
KIND_OTHER = "other (copied)"
_KINDS = (KIND_ROUTED, KIND_SHARED, KIND_IGNORED, KIND_OTHER)

#: ``(dense_key, weight [O, I]) -> (pruned weight [O, I], mask [O, I] bool)``.
Pruner = Callable[[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class ConvertOptions:
    """Everything ``samoyeds-convert`` accepts; the CLI builds its parser from these fields' ``help`` metadata."""

    source: Path = field(metadata={"help": "dense Hugging Face MoE checkpoint directory (SRC_DIR)"})
    output: Path = field(metadata={"help": "directory to create (OUT_DIR); written atomically"})
    pattern: str = field(
        default="1:2:128+2:4",
        metadata={"help": "sparsity pattern of the expert weights: '2:4' or '1:2:V+2:4' with V in 32, 64, 128, 256"},
    )
    method: str = field(
        default="magnitude",
        metadata={
            "help": "pruner: magnitude (no data), wanda (|W|*||X||), sparsegpt (OBS with weight update); "
            "wanda and sparsegpt need --calibration",
            "choices": METHODS,
        },
    )
    calibration: Path | None = field(
        default=None,
        metadata={"help": "calibration text: a .txt file, or .jsonl with a 'text' field per line", "metavar": "FILE"},
    )
    num_calibration_samples: int = field(
        default=128, metadata={"help": "calibration sequences of --calibration-seq-len tokens (fewer if short)"}
    )
    calibration_seq_len: int = field(default=512, metadata={"help": "tokens per calibration sequence"})
    targets: tuple[str, ...] = field(
        default=("experts",),
        metadata={"help": "comma-separated weights to prune: experts (routed) and/or shared_experts"},
    )
    ignore: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "regex (repeatable) matched with re.search against MoE module names such as "
            "'model.layers.3.mlp.experts'; matching modules stay dense",
            "metavar": "REGEX",
        },
    )
    dtype: str | None = field(
        default=None,
        metadata={"help": "dtype of values and copied float tensors (default: keep the source's)", "choices": DTYPES},
    )
    router_weighted: bool = field(
        default=False,
        metadata={"help": "weight each calibration token's statistics by its routing probability (wanda/sparsegpt)"},
    )
    max_shard_size: str | None = field(
        default=None,
        metadata={"help": "largest output shard, e.g. 2GB or 500MB (default: the largest source shard, <= 5GB)"},
    )
    dry_run: bool = field(
        default=False, metadata={"help": "print what would be pruned and the bytes before/after, write nothing"}
    )
    overwrite: bool = field(default=False, metadata={"help": "replace OUT_DIR if it exists"})
    device: str | None = field(
        default=None, metadata={"help": "calibration device (default: cuda if available, else cpu)"}
    )


@dataclass(frozen=True)
class _TensorLocation:
    shard: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    start: int  # absolute byte offset in the shard file
    stop: int


@dataclass
class CheckpointSource:
    """A dense checkpoint on disk: config and the tensors' locations, shapes and dtypes (headers only).

    Tensors are read with plain positioned reads, not memory maps: a mapped shard's touched pages count as resident
    memory until it is unmapped, while a read only holds the tensor itself (the page cache is not ours).

    Attributes
    ----------
    root:
        The checkpoint directory.
    config:
        ``config.json`` content.
    layout:
        Expert layout of ``config["model_type"]``.
    shards:
        Shard file names in reading order.
    tensors:
        Key -> ``(shard file name, shape, dtype)`` in file order.
    """

    root: Path
    config: dict[str, object]
    layout: ExpertLayout
    shards: list[str]
    tensors: dict[str, tuple[str, tuple[int, ...], torch.dtype]]
    _locations: dict[str, _TensorLocation] = field(default_factory=dict, repr=False)
    _files: dict[str, int] = field(default_factory=dict, repr=False)

    def read(self, key: str) -> torch.Tensor:
        """Load one tensor (a fresh CPU tensor owning its memory)."""
        loc = self._locations[key]
        fd = self._files.get(loc.shard)
        if fd is None:
            fd = self._files[loc.shard] = os.open(self.root / loc.shard, os.O_RDONLY)
        buffer = bytearray(loc.stop - loc.start)
        view, done = memoryview(buffer), 0
        while done < len(buffer):
            count = os.preadv(fd, [view[done:]], loc.start + done)
            if count == 0:
                raise ValueError(f"{self.root / loc.shard}: file ends inside tensor {key} (truncated download?)")
            done += count
        if not buffer:
            return torch.empty(loc.shape, dtype=loc.dtype)
        return torch.frombuffer(buffer, dtype=loc.dtype).reshape(loc.shape)

    def close(self) -> None:
        """Close the open shard files."""
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()

    def shard_bytes(self) -> dict[str, int]:
        """File size of every shard."""
        return {name: (self.root / name).stat().st_size for name in self.shards}


def _read_header(path: Path) -> tuple[int, dict[str, dict[str, object]]]:
    """``(data start offset, header entries)`` of a safetensors file."""
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (size,) = struct.unpack("<Q", head)
        if size > 100 * 2**20:
            raise ValueError(f"{path}: not a safetensors file (header of {size} bytes)")
        try:
            header = json.loads(handle.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not a safetensors file (bad header: {err})") from err
    header.pop("__metadata__", None)
    return 8 + size, header


@dataclass(frozen=True)
class TensorPlan:
    """What happens to one source tensor.

    Attributes
    ----------
    key:
        Source key.
    kind:
        One of the ``KIND_*`` labels (pruned routed/shared experts, ignored experts, copied).
    layer:
        Decoder layer index, or None (embeddings, final norm, LM head).
    module:
        For experts: the MoE module name (``model.layers.3.mlp.experts``), else None.
    bytes_in, bytes_out:
        Exact source and output bytes.
    weights:
        Number of ``[O, I]`` weights packed from it (a fused tensor holds many).
    """

    key: str
    kind: str
    layer: int | None
    module: str | None
    bytes_in: int
    bytes_out: int
    weights: int


@dataclass
class ConvertPlan:
    """Output of ``plan``: a decision for every tensor plus the settings that apply to all of them."""

    source: CheckpointSource
    options: ConvertOptions
    pattern: SparsityPattern
    out_dtype: torch.dtype | None
    tensors: list[TensorPlan]
    ignored_modules: list[str]
    max_shard_bytes: int

    def totals(self) -> dict[str, dict[str, int]]:
        """Per kind: tensors, weights packed, bytes in, bytes out."""
        table = {kind: {"tensors": 0, "weights": 0, "bytes_in": 0, "bytes_out": 0} for kind in _KINDS}
        for t in self.tensors:
            row = table[t.kind]
            row["tensors"] += 1
            row["weights"] += t.weights
            row["bytes_in"] += t.bytes_in
            row["bytes_out"] += t.bytes_out
        return {kind: row for kind, row in table.items() if row["tensors"]}


@dataclass
class ConvertSummary:
    """What a conversion did (printed as the final table, returned for tests and benchmarks)."""

    output: Path | None
    layers: int
    experts: int
    weights_pruned: int
    density: float
    bytes_in: int
    bytes_out: int
    seconds: float
    fallback_weights: int = 0
    per_kind: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def gbps(self) -> float:
        """Source bytes converted per second, in GB/s (1e9)."""
        return self.bytes_in / self.seconds / 1e9 if self.seconds > 0 else 0.0


def parse_size(text: str) -> int:
    """Bytes in a size such as ``2GB``, ``500MB``, ``1.5G`` or ``123456`` (decimal units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", text, flags=re.IGNORECASE)
    if match is None:
        raise ValueError(f"--max-shard-size: cannot parse {text!r}; use e.g. 2GB, 500MB or a byte count")
    unit = match[2].upper().rstrip("B").rstrip("I")
    scale = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[unit]
    return int(float(match[1]) * scale)


def _shard_names(root: Path) -> list[str]:
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise ValueError(f"{index}: not a safetensors index (no 'weight_map'): {err}") from err
        names = list(dict.fromkeys(weight_map.values()))
        missing = [n for n in names if not (root / n).is_file()]
        if missing:
            raise ValueError(f"{index} names shards that do not exist: {missing[:3]}")
        return names
    names = sorted(p.name for p in root.glob("*.safetensors"))
    if not names:
        raise ValueError(f"{root}: no *.safetensors files (only safetensors checkpoints are converted)")
    return names


def resolve(options: ConvertOptions) -> CheckpointSource:
    """Resolve stage: read the source's config and shard headers (no tensor data).

    Raises
    ------
    ValueError
        Missing/invalid config.json, unsupported architecture (listing the supported), no safetensors, unknown dtype.
    """
    root = Path(options.source)
    config_path = root / "config.json"
    if not config_path.is_file():
        raise ValueError(f"SRC_DIR {root}: no config.json (expected a Hugging Face model directory)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path}: invalid JSON: {err}") from err
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise ValueError(f"{config_path}: no 'model_type'")
    layout = get_layout(model_type)
    shards = _shard_names(root)
    tensors: dict[str, tuple[str, tuple[int, ...], torch.dtype]] = {}
    locations: dict[str, _TensorLocation] = {}
    for shard in shards:
        start, header = _read_header(root / shard)
        for key, entry in header.items():
            name = entry.get("dtype")
            if name not in _SAFETENSORS_DTYPES:
                raise ValueError(f"{root / shard}: tensor {key} has unsupported dtype {name}")
            if key in tensors:
                raise ValueError(f"{root}: tensor {key} appears in both {tensors[key][0]} and {shard}")
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
            tensors[key] = (shard, shape, _SAFETENSORS_DTYPES[name])
            locations[key] = _TensorLocation(shard, shape, _SAFETENSORS_DTYPES[name], start + begin, start + end)
    return CheckpointSource(root, config, layout, shards, tensors, locations)


def _packed_nbytes(n_out: int, n_in: int, pattern: SparsityPattern, value_bytes: int) -> int:
    # Exact for every shape the pattern tiles; the Validate stage rejects the others with the tensor's name.
    return round(n_out * n_in * pattern.bytes_per_weight(value_bytes))


def _shared_regex(layout: ExpertLayout) -> re.Pattern[str] | None:
    if not layout.shared_modules:
        return None
    names = "|".join(re.escape(m) for m in layout.shared_modules)
    projs = "|".join(re.escape(p) for p in layout.projections)
    return re.compile(rf"^(?P<module>.+\.(?:{names}))\.(?P<proj>{projs})\.weight$")


def plan(source: CheckpointSource, options: ConvertOptions) -> ConvertPlan:
    """Plan stage: decide and size every tensor's output.

    Raises
    ------
    ValueError
        For a bad ``--pattern``, ``--targets``, ``--ignore`` regex or ``--max-shard-size``.
    """
    pattern = parse_pattern(options.pattern)
    unknown = [t for t in options.targets if t not in TARGETS]
    if unknown or not options.targets:
        raise ValueError(f"--targets {','.join(options.targets)!r}: choose from {', '.join(TARGETS)}")
    try:
        ignore = [re.compile(p) for p in options.ignore]
    except re.error as err:
        raise ValueError(f"--ignore: invalid regex ({err})") from err
    out_dtype = DTYPES[options.dtype] if options.dtype else None
    layout = source.layout
    shared_re = _shared_regex(layout) if "shared_experts" in options.targets else None
    prune_routed = "experts" in options.targets

    entries: list[TensorPlan] = []
    ignored: dict[str, None] = {}
    for key, (_, shape, dtype) in source.tensors.items():
        numel = 1
        for s in shape:
            numel *= s
        bytes_in = numel * dtype.itemsize
        out_bytes = (out_dtype.itemsize if out_dtype and dtype.is_floating_point else dtype.itemsize) * numel
        value_bytes = out_dtype.itemsize if out_dtype else dtype.itemsize
        layer_match = _LAYER_RE.match(key)
        layer = int(layer_match["index"]) if layer_match else None
        parts = split_expert_tensors(key, torch.empty(shape, dtype=dtype, device="meta"), layout)
        if parts is not None:
            module = f"{parts[0][1]}.{layout.moe_module}.experts"
            if not prune_routed or any(r.search(module) for r in ignore):
                ignored[module] = None
                entries.append(TensorPlan(key, KIND_IGNORED, layer, module, bytes_in, out_bytes, 0))
                continue
            packed = sum(_packed_nbytes(*w.shape, pattern, value_bytes) for *_, w in parts)
            entries.append(TensorPlan(key, KIND_ROUTED, layer, module, bytes_in, packed, len(parts)))
            continue
        shared = shared_re.match(key) if shared_re is not None else None
        if shared is not None and len(shape) == 2 and not any(r.search(shared["module"]) for r in ignore):
            packed = _packed_nbytes(shape[0], shape[1], pattern, value_bytes)
            entries.append(TensorPlan(key, KIND_SHARED, layer, shared["module"], bytes_in, packed, 1))
            continue
        entries.append(TensorPlan(key, KIND_OTHER, layer, None, bytes_in, out_bytes, 0))

    if options.max_shard_size:
        max_shard = parse_size(options.max_shard_size)
    else:
        max_shard = min(max(source.shard_bytes().values()), 5 * 10**9)
    return ConvertPlan(source, options, pattern, out_dtype, entries, list(ignored), max(1, max_shard))


def validate(conversion: ConvertPlan) -> None:
    """Validate stage: everything that can fail is checked here, before any output exists.

    Raises
    ------
    ValueError
        Naming the tensor/argument: a shape the pattern cannot tile, an expert dtype that cannot be packed,
        an ``--ignore`` regex that matches nothing, missing calibration input, OUT_DIR exists without
        ``--overwrite``, SRC_DIR == OUT_DIR, a config without ``architectures``.
    """
    options, source = conversion.options, conversion.source
    pattern, layout = conversion.pattern, source.layout
    if not source.config.get("architectures"):
        raise ValueError(f"{source.root / 'config.json'}: 'architectures' is missing (vLLM needs it); add it first")
    routed_shapes = {
        t.key: source.tensors[t.key][1] for t in conversion.tensors if t.kind in (KIND_ROUTED, KIND_IGNORED)
    }
    if not routed_shapes:
        check_expert_shapes({}, layout.model_type, pattern)  # raises "no routed-expert weights found"
    for t in conversion.tensors:
        if t.kind not in (KIND_ROUTED, KIND_SHARED):
            continue
        _, shape, dtype = source.tensors[t.key]
        if dtype not in VALUE_DTYPES:
            raise ValueError(
                f"{t.key}: dtype {dtype} cannot be pruned and packed (bf16, fp16 or fp32 only); "
                "dequantize the checkpoint to bf16 first"
            )
        for dense_key, *_, weight in split_expert_tensors(t.key, torch.empty(shape, device="meta"), layout) or [
            (t.key, torch.empty(shape, device="meta"))
        ]:
            pattern.check_shape(weight.shape[0], weight.shape[1], name=dense_key)
    for regex in options.ignore:
        modules = {t.module for t in conversion.tensors if t.module is not None}
        if not any(re.search(regex, m) for m in modules):
            raise ValueError(
                f"--ignore {regex!r} matches no MoE module; names look like {sorted(modules)[:2]} "
                "(the regex is applied with re.search)"
            )
    if options.method not in METHODS:
        raise ValueError(f"--method {options.method!r}: choose from {', '.join(METHODS)}")
    if options.method != "magnitude":
        if options.calibration is None:
            raise ValueError(f"--method {options.method} needs --calibration FILE.txt or FILE.jsonl")
        path = Path(options.calibration)
        if not path.is_file():
            raise ValueError(f"--calibration {path}: no such file")
        if path.suffix not in (".txt", ".jsonl"):
            raise ValueError(f"--calibration {path}: expected a .txt or .jsonl file")
        if options.num_calibration_samples < 1 or options.calibration_seq_len < 2:
            raise ValueError("--num-calibration-samples must be >= 1 and --calibration-seq-len >= 2")
    elif options.router_weighted:
        raise ValueError("--router-weighted only applies to --method wanda or sparsegpt")
    out = Path(options.output)
    if out.resolve() == source.root.resolve():
        raise ValueError(f"OUT_DIR {out} is SRC_DIR; choose another directory")
    if out.exists() and not options.overwrite and not options.dry_run:
        raise ValueError(f"OUT_DIR {out} already exists; pass --overwrite to replace it")


def _remove_stale_temp_dirs(out_dir: Path) -> None:
    """Remove temporary directories of earlier runs for ``out_dir`` whose process is gone (killed with SIGKILL)."""
    for path in out_dir.parent.glob(f".{out_dir.name}.samoyeds-tmp-*"):
        try:
            pid = int(path.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            logger.warning("removing %s, left by an interrupted conversion (process %d is gone)", path, pid)
            shutil.rmtree(path, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory beside ``out_dir``; on success it replaces ``out_dir``, on any error it is removed.

    Raises
    ------
    ValueError
        If ``out_dir`` exists and ``overwrite`` is False.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise ValueError(f"OUT_DIR {out_dir} already exists; pass --overwrite to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.samoyeds-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.samoyeds-old-{os.getpid()}"
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def magnitude_pruner(pattern: SparsityPattern) -> Pruner:
    """The data-free pruner: best pattern mask of ``|W|``, weights unchanged."""

    def prune(dense_key: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return weight, select_mask(magnitude_scores(weight), pattern)

    return prune


class _Emitter:
    """Turns a source tensor into output tensors (pruned + packed, or copied) and feeds the shard writer."""

    def __init__(self, conversion: ConvertPlan, writer: ShardWriter) -> None:
        self.conversion = conversion
        self.writer = writer
        self.layout = conversion.source.layout
        self.kept = 0
        self.total = 0
        self.experts: set[tuple[str, int]] = set()

    def _add(self, key: str, tensor: torch.Tensor) -> None:
        self.writer.add(key, tensor)

    def _pack(self, out_stem: str, dense_key: str, weight: torch.Tensor, pruner: Pruner) -> None:
        pruned, mask = pruner(dense_key, weight)
        dtype = self.conversion.out_dtype or weight.dtype
        packed = pack(pruned.to(dtype).contiguous(), mask, self.conversion.pattern)
        self.kept += int(mask.sum())
        self.total += mask.numel()
        for suffix, tensor in packed.tensors().items():
            self._add(f"{out_stem}.{suffix}", tensor)

    def emit(self, entry: TensorPlan, tensor: torch.Tensor, pruner: Pruner) -> None:
        """Write the outputs of one source tensor."""
        if entry.kind == KIND_ROUTED:
            for dense_key, layer_prefix, expert, proj, weight in split_expert_tensors(entry.key, tensor, self.layout):
                self.experts.add((layer_prefix, expert))
                stem = self.layout.expert_key(layer_prefix, expert, proj, "").removesuffix(".")
                self._pack(stem, dense_key, weight, pruner)
            return
        if entry.kind == KIND_SHARED:
            self._pack(entry.key.removesuffix(".weight"), entry.key, tensor, pruner)
            return
        out_dtype = self.conversion.out_dtype
        if out_dtype is not None and tensor.dtype.is_floating_point:
            tensor = tensor.to(out_dtype)
        if entry.kind == KIND_IGNORED:
            parts = split_expert_tensors(entry.key, tensor, self.layout)
            for dense_key, *_, weight in parts or ():
                self._add(dense_key, weight.contiguous())
            return
        self._add(canonical_key(entry.key, self.layout), tensor)


def _order(conversion: ConvertPlan, by_layer: bool) -> list[TensorPlan]:
    if not by_layer:
        return list(conversion.tensors)  # file order: shard by shard
    outside = [t for t in conversion.tensors if t.layer is None]
    inside = sorted((t for t in conversion.tensors if t.layer is not None), key=lambda t: t.layer)
    return outside + inside


def _provenance(conversion: ConvertPlan, extra: dict[str, object]) -> dict[str, object]:
    options = conversion.options
    prov: dict[str, object] = {
        "method": options.method,
        "tool": f"samoyeds-convert {__version__}",
        "source": conversion.source.root.name,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if options.method != "magnitude":
        prov["router_weighted"] = options.router_weighted
    prov.update(extra)
    return prov


def convert(conversion: ConvertPlan, *, progress: bool = True) -> ConvertSummary:
    """Convert stage: stream the source into the sparse checkpoint at ``options.output`` (atomically).

    Returns
    -------
    ConvertSummary
        Layers, experts, density and bytes of the run.
    """
    options, source = conversion.options, conversion.source
    start = time.perf_counter()
    by_layer = options.method != "magnitude"
    entries = _order(conversion, by_layer)
    total_in = sum(t.bytes_in for t in entries)
    fallback = 0
    with atomic_output_dir(options.output, options.overwrite) as tmp:
        writer = ShardWriter(tmp, conversion.max_shard_bytes)
        emitter = _Emitter(conversion, writer)
        bar = tqdm(
            total=total_in, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress, desc="converting"
        )
        extra: dict[str, object] = {}
        with bar:
            if by_layer:
                from .calibration import LayerwiseCalibrator  # Transformers is only needed for calibration

                calibrator = LayerwiseCalibrator(conversion)
                extra = calibrator.provenance()
                current: int | None = None
                pruner: Pruner = magnitude_pruner(conversion.pattern)
                for entry in entries:
                    if entry.layer is not None and entry.layer != current:
                        current = entry.layer
                        source.close()
                        pruner = calibrator.prune_layer(entry.layer)
                    emitter.emit(entry, source.read(entry.key), pruner)
                    bar.update(entry.bytes_in)
                fallback = calibrator.fallback_weights
                extra["fallback_to_magnitude"] = fallback
            else:
                pruner = magnitude_pruner(conversion.pattern)
                shard = None
                for entry in entries:
                    if source.tensors[entry.key][0] != shard:
                        shard = source.tensors[entry.key][0]
                        source.close()
                    emitter.emit(entry, source.read(entry.key), pruner)
                    bar.update(entry.bytes_in)
        writer.close()
        config = dict(source.config)
        if conversion.out_dtype is not None:
            name = str(conversion.out_dtype).removeprefix("torch.")
            config["dtype"] = name
            if "torch_dtype" in config:
                config["torch_dtype"] = name
        quant = build_quantization_config(
            conversion.pattern,
            ignore=conversion.ignored_modules,
            pruning=_provenance(conversion, extra),
            targets=options.targets,
        )
        write_config_json(tmp, config, quant)
        copy_tokenizer_files(source.root, tmp)
    source.close()
    totals = conversion.totals()
    return ConvertSummary(
        output=Path(options.output),
        layers=len({t.layer for t in conversion.tensors if t.kind == KIND_ROUTED}),
        experts=len(emitter.experts),
        weights_pruned=sum(t.weights for t in conversion.tensors),
        density=emitter.kept / emitter.total if emitter.total else 1.0,
        bytes_in=sum(t.bytes_in for t in conversion.tensors),
        bytes_out=writer.total_bytes,
        seconds=time.perf_counter() - start,
        fallback_weights=fallback,
        per_kind=totals,
    )


def run(options: ConvertOptions, *, progress: bool = True) -> tuple[ConvertPlan, ConvertSummary | None]:
    """Resolve, Plan, Validate, then Convert (skipped for ``dry_run``).

    Returns
    -------
    tuple
        The plan and the summary (None for a dry run).

    Raises
    ------
    ValueError
        From any stage, before anything is written for every input error.
    """
    source = resolve(options)
    conversion = plan(source, options)
    validate(conversion)
    logger.info(
        "samoyeds-convert: %s (%s) -> %s, pattern %s, method %s, %d tensors in %d shard(s)",
        source.root,
        source.layout.model_type,
        options.output,
        conversion.pattern,
        options.method,
        len(source.tensors),
        len(source.shards),
    )
    if options.dry_run:
        return conversion, None
    return conversion, convert(conversion, progress=progress)
