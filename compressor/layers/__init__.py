"""Factorized layers: LowRankLinear (W = U S Vᵀ) and TuckerConv2d (Tucker-2 on channel modes).

Each type describes itself (:mod:`.protocol`: costs, export forms, serialization, budget offer,
latency key) and is registered by its kind (:mod:`.registry`); code outside this package asks
a layer, or the registry, and never tests a layer's type.
"""

from .attention import ProjectedMultiheadAttention, project_attention_, projected_attention
from .base import BasisChange, LowRankLayer, low_rank_layers
from .conv import TuckerConv2d
from .linear import LowRankLinear
from .protocol import CostFn, LatencyKey
from .registry import layer_kinds, layer_type, layer_type_for, register_layer_type, unregister_layer_type

# The registered types, in the order a dense module's candidates are tried (and kinds are listed).
register_layer_type(LowRankLinear)
register_layer_type(TuckerConv2d)

__all__ = [
    "BasisChange",
    "CostFn",
    "LatencyKey",
    "LowRankLayer",
    "LowRankLinear",
    "ProjectedMultiheadAttention",
    "TuckerConv2d",
    "layer_kinds",
    "layer_type",
    "layer_type_for",
    "low_rank_layers",
    "project_attention_",
    "projected_attention",
    "register_layer_type",
    "unregister_layer_type",
]
