"""β · Σ_layers ‖S‖_*: the nuclear norm of every factorized layer's core.

‖S‖_* = Σᵢ σᵢ(S), the convex envelope of the rank on the spectral-norm ball (Fazel, PhD thesis,
2002); as a penalty in training, Alvarez & Salzmann, "Compression-aware training of deep
networks", NeurIPS 2017. Its subgradient P Qᵀ (S = P Σ Qᵀ) lowers every
singular value by the same step, so the small ones reach zero first and the truncation then
drops them: it compresses rather than equalizes (R(S) of :mod:`.spectral` equalizes). Computed
in float32 on the core matrix (S, or C₍₀₎ for a conv), never on the bases.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...layers import LowRankLayer
from .base import LayerPenalty, register


def layer_nuclear_norm(layer: LowRankLayer) -> Tensor:
    """‖core matrix‖_* in float32, differentiable in the core."""
    return torch.linalg.matrix_norm(layer.core_matrix().float(), ord="nuc")


@register("nuclear")
class Nuclear(LayerPenalty):
    """β · Σ_layers ‖core‖_*: ``train.beta`` with ``train.regularizer: nuclear``."""

    value = staticmethod(layer_nuclear_norm)
