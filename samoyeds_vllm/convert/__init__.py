"""Dense Hugging Face MoE checkpoint -> samoyeds sparse checkpoint (library behind ``samoyeds-convert``)."""

from .architectures import SUPPORTED_MODEL_TYPES, ExpertLayout, get_layout
from .pipeline import ConvertOptions, ConvertSummary, run
from .sparsify import (
    QUANT_METHOD,
    SparsifyResult,
    build_quantization_config,
    check_expert_shapes,
    iter_sparse_tensors,
    sparsify_state_dict,
    split_expert_tensors,
)
from .writer import TOKENIZER_FILES, ShardWriter, copy_tokenizer_files, write_checkpoint, write_config_json

__all__ = [
    "QUANT_METHOD",
    "SUPPORTED_MODEL_TYPES",
    "TOKENIZER_FILES",
    "ConvertOptions",
    "ConvertSummary",
    "ExpertLayout",
    "ShardWriter",
    "SparsifyResult",
    "build_quantization_config",
    "check_expert_shapes",
    "copy_tokenizer_files",
    "get_layout",
    "iter_sparse_tensors",
    "run",
    "sparsify_state_dict",
    "split_expert_tensors",
    "write_checkpoint",
    "write_config_json",
]
