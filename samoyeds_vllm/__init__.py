"""samoyeds-vllm: dual-side sparse Mixture-of-Experts for vLLM and Hugging Face Transformers."""

__version__ = "0.1.0"
