"""Mask selection and pruning under a sparsity pattern (pure functions; convert/ orchestrates).

* ``magnitude_scores`` -- ``|W|`` (no data);
* ``wanda_scores`` -- ``|W| * ||X||_2`` per input channel;
* ``sparsegpt_prune`` -- OBS-style pruning with weight updates from the inputs' Hessian;
* ``select_mask`` -- the best mask under "2:4" / "1:2:V+2:4" for any score tensor.
"""

from .masks import magnitude_scores, select_mask
from .sparsegpt import hessian_inverse_factor, sparsegpt_prune
from .wanda import wanda_scores

__all__ = ["hessian_inverse_factor", "magnitude_scores", "select_mask", "sparsegpt_prune", "wanda_scores"]
