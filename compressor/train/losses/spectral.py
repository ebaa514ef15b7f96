"""β · Σ_layers R(S): the spectral regularizer of RobustDLRT.

R(S) = ‖SᵀS − α²I‖_F with α² = ‖S‖_F² / r (Schotthöfer, Yang, Schnake, arXiv 2505.08022,
Definition 1), on each factorized layer's core matrix (S, or a conv core's mode-0 unfolding
C₍₀₎), never on its bases. R = 0 exactly when every singular value of the core equals α, so
β pulls the cores towards condition number 1 (the maths: :func:`compressor.functional.spectral_regularizer`,
float32 even under autocast, closed-form gradient of Prop. 1a).
"""

from __future__ import annotations

from torch import Tensor

from ...functional import spectral_regularizer
from ...layers import LowRankLayer
from .base import LayerPenalty, register


def layer_regularizer(layer: LowRankLayer) -> Tensor:
    """R of one layer's core matrix (float32, or float64 for a float64 core), differentiable in the core."""
    return spectral_regularizer(layer.core_matrix())


@register("spectral")
class Spectral(LayerPenalty):
    """β · Σ_layers R(core): ``train.beta`` with ``train.regularizer: spectral`` (the default)."""

    value = staticmethod(layer_regularizer)
