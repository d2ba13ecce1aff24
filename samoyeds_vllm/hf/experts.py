"""``SamoyedsExperts``: a drop-in for Transformers' fused MoE experts module, holding packed weights."""

from __future__ import annotations

import torch
from torch import nn

from ..formats import PackedWeight, SparsityPattern, packed_shapes, parse_pattern, validate
from ..ops import MoEWeights, moe_forward, prepare_moe_weights

__all__ = ["SamoyedsExperts"]


class SamoyedsExperts(nn.Module):
    """Routed SwiGLU experts on packed sparse weights, same call as Transformers' experts modules.

    Buffers (persistent, filled by the Transformers loader from the per-expert checkpoint tensors):

    * ``w13_sp_values [E, 2I/g, H/2]``, ``w13_sp_meta [E, 2I/g, H/8]`` uint8, ``w13_sp_rowsel [E, I, H/V]`` uint8
      (samoyeds only): gate rows ``[0, I)`` then up rows ``[I, 2I)`` of ``W13 [E, 2I, H]``;
    * ``w2_sp_values [E, H/g, I/2]``, ``w2_sp_meta [E, H/g, I/8]``, ``w2_sp_rowsel [E, H/2, I/V]``: ``W2 [E, H, I]``;

    with ``g = 1`` for 2:4 and ``2`` for ``1:2:V+2:4``.

    Parameters
    ----------
    num_experts, hidden_size, intermediate_size:
        E, H and I.
    pattern:
        ``"2:4"`` or ``"1:2:V+2:4"``.
    dtype:
        Dtype of the values (bf16, fp16 or fp32).
    device:
        Where to allocate (``"meta"`` while Transformers builds the model).
    name:
        Module path, used in error messages.

    Raises
    ------
    ValueError
        If H or I do not tile by the pattern.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        pattern: str | SparsityPattern,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "meta",
        name: str = "experts",
    ) -> None:
        super().__init__()
        self.pattern = parse_pattern(pattern)
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden_size, intermediate_size
        self.module_name = name
        self.pattern.check_shape(2 * intermediate_size, hidden_size, name=f"{name}.w13")
        self.pattern.check_shape(hidden_size, intermediate_size, name=f"{name}.w2")
        self.expected_shapes = {
            "w13": packed_shapes(self.pattern, 2 * intermediate_size, hidden_size, (num_experts,)),
            "w2": packed_shapes(self.pattern, hidden_size, intermediate_size, (num_experts,)),
        }
        for weight, shapes in self.expected_shapes.items():
            for suffix, shape in shapes.items():
                buffer_dtype = dtype if suffix == "sp_values" else torch.uint8
                self.register_buffer(f"{weight}_{suffix}", torch.empty(shape, dtype=buffer_dtype, device=device))
        #: True once the values/meta buffers hold the CUDA kernel layout (see ``ops.prepare_moe_weights``).
        self.kernel_layout = False

    def extra_repr(self) -> str:
        return f"E={self.num_experts}, H={self.hidden_dim}, I={self.intermediate_dim}, pattern={self.pattern}"

    def packed(self, weight: str) -> PackedWeight:
        """``"w13"`` or ``"w2"`` as a stacked ``PackedWeight`` (canonical layout only)."""
        if self.kernel_layout:
            raise ValueError(f"{self.module_name}: buffers hold the kernel layout, not the canonical one")
        return PackedWeight(
            self.pattern,
            getattr(self, f"{weight}_sp_values"),
            getattr(self, f"{weight}_sp_meta"),
            getattr(self, f"{weight}_sp_rowsel", None),
        )

    def check_shapes(self) -> None:
        """Check every buffer was loaded (not on the meta device) with the expected shape.

        Raises
        ------
        ValueError
            Naming the buffer (``{module}.w13_sp_meta`` ...) that is missing or misshaped.
        """
        for weight, shapes in self.expected_shapes.items():
            for suffix, shape in shapes.items():
                tensor = getattr(self, f"{weight}_{suffix}")
                name = f"{self.module_name}.{weight}_{suffix}"
                if tensor.is_meta:
                    raise ValueError(f"{name} was not loaded from the checkpoint (still on the meta device)")
                if tuple(tensor.shape) != shape:
                    raise ValueError(
                        f"{name}: expected shape {shape} for pattern {self.pattern}, got {tuple(tensor.shape)}"
                    )

    def check_loaded(self) -> None:
        """``check_shapes``, then ``formats.validate`` on both stacked weights.

        Raises
        ------
        ValueError
            Naming the buffer that is missing or misshaped, or the tensor and index breaking the layout.
        """
        self.check_shapes()
        for weight in self.expected_shapes:
            validate(self.packed(weight), name=f"{self.module_name}.{weight}")

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """``out[t] = sum_j top_k_weights[t, j] * W2[e] @ (silu(W1[e] @ x[t]) * (W3[e] @ x[t]))``.

        Parameters
        ----------
        hidden_states:
            ``[T, H]`` in the values' dtype.
        top_k_index:
            ``[T, k]`` expert ids.
        top_k_weights:
            ``[T, k]`` routing weights.

        Returns
        -------
        torch.Tensor
            ``[T, H]`` in ``hidden_states.dtype``.
        """
        return moe_forward(hidden_states, top_k_weights, top_k_index, self.moe_weights())

    def moe_weights(self) -> MoEWeights:
        """The buffers as ``MoEWeights``; on a GPU the first call reorders them into the kernel layout once."""
        if not self.kernel_layout and self.w13_sp_values.is_cuda:
            prepared = prepare_moe_weights(self.packed("w13"), self.packed("w2"))
            if prepared.kernel_layout:
                for name, tensor in prepared.tensors().items():
                    if tensor is not None:
                        setattr(self, name, tensor)
                self.kernel_layout = True
        return MoEWeights(
            self.pattern.chunk,
            self.kernel_layout,
            self.w13_sp_values,
            self.w13_sp_meta,
            getattr(self, "w13_sp_rowsel", None),
            self.w2_sp_values,
            self.w2_sp_meta,
            getattr(self, "w2_sp_rowsel", None),
        )
