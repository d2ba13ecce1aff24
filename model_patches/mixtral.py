"""Mixtral: ``MixtralExperts`` (on-disk keys ``block_sparse_moe.experts.{e}.w1|w3|w2``)."""

from ._base import ExpertsPatch

PATCHES = (ExpertsPatch("mixtral", ("MixtralExperts",), gate="w1", up="w3", down="w2"),)
