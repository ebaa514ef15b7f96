"""A term of the training objective, and the registry the trainer builds its terms from.

The trainer's step, for the terms t₁ … tₙ the recipe lists (:meth:`TrainSection.loss_terms`):

    x ← tᵢ.inputs(x, y, step)                    the examples the student trains on
    logits = model(x)
    L ← tᵢ.data_loss(L, logits, x_clean, y)      from L = CE(logits, y): terms on the logits
    objective = L + Σᵢ wᵢ · tᵢ.penalty()         terms on the factorized layers' cores

A term overrides the hooks it needs; the others leave the step as it is. A new term is one file
with a class decorated by :func:`register`: the trainer and the recipe's mapping name it only
through this registry.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ...errors import unknown_name
from ...layers import LowRankLayer
from ...runtime import DistContext, registering

log = logging.getLogger(__name__)

_REGISTRY: dict[str, type[LossTerm]] = {}


@dataclass
class TrainingContext:
    """What a term may use: the model being trained, its factorized layers, where and how it runs."""

    model: nn.Module
    layers: Mapping[str, LowRankLayer]
    device: torch.device
    amp: str = "off"
    """The student's autocast setting (``train.amp``), for a term that runs a model itself."""
    seed: int = 0
    dist: DistContext = field(default_factory=DistContext)
    teacher: nn.Module | None = None
    """The model a distillation term matches (None: none was given)."""


class LossTerm:
    """One term of the objective; see the module docstring for where each hook acts.

    ``weight`` is the term's factor in the objective (β for a penalty); a term that changes
    the examples rather than adding to the loss describes itself without one.
    """

    name: str = "term"
    weight: float = 1.0

    def __init__(self, ctx: TrainingContext) -> None:
        self.ctx = ctx

    def inputs(self, x: Tensor, y: Tensor, step: int) -> Tensor:
        """The examples the student trains on at global step ``step`` (default: ``x``)."""
        return x

    def data_loss(self, loss: Tensor, logits: Tensor, clean: Tensor, y: Tensor) -> Tensor:
        """The data loss after this term: ``loss`` so far, the student's ``logits`` on the
        examples it trained on, the ``clean`` batch they were made from (default: ``loss``)."""
        return loss

    def penalty(self) -> Tensor | None:
        """The unweighted penalty the objective adds ``weight`` times (default: None, none)."""
        return None

    @property
    def data_weight(self) -> float:
        """The factor this term leaves on the cross-entropy (1: it does not rescale it)."""
        return 1.0

    def describe(self) -> dict[str, Any]:
        """What the report says about this term: its name, weight and settings."""
        return {"term": self.name, "weight": self.weight}


class LayerPenalty(LossTerm):
    """β · Σ_layers value(layer): a penalty on every factorized layer's core, summed in the
    model's layer order (the float additions in the order the trainer always summed them)."""

    def __init__(self, ctx: TrainingContext, *, weight: float) -> None:
        super().__init__(ctx)
        self.weight = float(weight)

    @staticmethod
    def value(layer: LowRankLayer) -> Tensor:
        raise NotImplementedError

    def penalty(self) -> Tensor | None:
        if not self.ctx.layers:
            return None
        return torch.stack([self.value(layer) for layer in self.ctx.layers.values()]).sum()


def register(name: str) -> Callable[[type[LossTerm]], type[LossTerm]]:
    """Class decorator: make a term available to :func:`create` under ``name``."""
    return registering(_REGISTRY, name, "loss term", log)


def list_terms() -> list[str]:
    """Names accepted by :func:`create`, sorted."""
    return sorted(_REGISTRY)


def create(name: str, ctx: TrainingContext, **options: Any) -> LossTerm:
    """Build term ``name`` with its recipe options.

    Raises:
        UnknownNameError: ``name`` is not registered (the message lists the valid names).
    """
    if name not in _REGISTRY:
        raise unknown_name("loss term", name, list_terms())
    return _REGISTRY[name](ctx, **options)
