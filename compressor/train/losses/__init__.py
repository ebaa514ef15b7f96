"""Terms of the training objective, one a file, in a registry (like :mod:`compressor.attacks`).

>>> terms = [create(name, ctx, **options) for name, options in recipe.train.loss_terms()]

``spectral`` (β·R(S), the paper's regularizer), ``nuclear`` (β·Σ‖S‖_*), ``adversarial``
(training on adversarial examples), ``distill`` (KL to a teacher's soft labels). Each file
states its formula and reference; :mod:`.base` says where each kind of term acts in a step.
"""

from __future__ import annotations

from .base import LayerPenalty, LossTerm, TrainingContext, create, list_terms, register

# importing the modules registers the terms
from . import adversarial, distill, nuclear, spectral  # noqa: E402,F401  isort: skip

__all__ = ["LayerPenalty", "LossTerm", "TrainingContext", "create", "list_terms", "register"]
