"""Factorized layers: LowRankLinear (W = U S Vᵀ) and TuckerConv2d (Tucker-2 on channel modes)."""

from .attention import ProjectedMultiheadAttention
from .base import BasisChange, LowRankLayer, low_rank_layers
from .conv import TuckerConv2d
from .linear import LowRankLinear

__all__ = [
    "BasisChange",
    "LowRankLayer",
    "LowRankLinear",
    "ProjectedMultiheadAttention",
    "TuckerConv2d",
    "low_rank_layers",
]
