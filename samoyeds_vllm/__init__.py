"""samoyeds-vllm: dual-side sparse Mixture-of-Experts for vLLM and Hugging Face Transformers."""

__version__ = "0.1.0"

# Transformers has no auto-discovery of quantization methods: registering "samoyeds" is what makes
# `AutoModelForCausalLM.from_pretrained(samoyeds_checkpoint)` work after `import samoyeds_vllm`. The hook is cheap
# (Transformers is not imported here) and registers once `transformers.quantizers.auto` is imported.
from .hf import install_import_hook as _install_hf_hook

_install_hf_hook()
