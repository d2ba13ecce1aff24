"""DeepSeek-V2 and DeepSeek-V3: ``DeepseekV2Experts`` / ``DeepseekV3Experts``.

Both have the same module layout and expert forward in Transformers 5 (only the router differs: V3 adds
group-limited routing and a score-correction bias, which stay dense and untouched), so one module serves both.
Dense ``shared_experts`` and the first ``first_k_dense_replace`` dense MLP layers are untouched.
"""

from ._base import ExpertsPatch

PATCHES = (
    ExpertsPatch("deepseek_v2", ("DeepseekV2Experts",), shared_modules=("shared_experts",)),
    ExpertsPatch("deepseek_v3", ("DeepseekV3Experts",), shared_modules=("shared_experts",)),
)
