"""Dense Hugging Face MoE checkpoint -> samoyeds sparse checkpoint (library behind ``samoyeds-convert``)."""

from .architectures import SUPPORTED_MODEL_TYPES, ExpertLayout, get_layout
from .sparsify import (
    QUANT_METHOD,
    SparsifyResult,
    build_quantization_config,
    check_expert_shapes,
    iter_sparse_tensors,
    sparsify_state_dict,
)
from .writer import TOKENIZER_FILES, copy_tokenizer_files, write_checkpoint

__all__ = [
    "QUANT_METHOD",
    "SUPPORTED_MODEL_TYPES",
    "TOKENIZER_FILES",
    "ExpertLayout",
    "SparsifyResult",
    "build_quantization_config",
    "check_expert_shapes",
    "copy_tokenizer_files",
    "get_layout",
    "iter_sparse_tensors",
    "sparsify_state_dict",
    "write_checkpoint",
]
