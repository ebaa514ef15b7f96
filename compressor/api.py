"""The Python entry point: ``compress(model, loader, beta)``.

Factorize a trained classifier and fine-tune it with RobustDLRT — the stages the ``compress``
command runs after its dense baseline (:mod:`compressor.stages`). Save the result with
:func:`compressor.export.export_model`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError
from .factorize import FactorizationReport
from .layers import low_rank_layers
from .recipe import Recipe, apply_overrides, load_recipe, recipe_from_dict
from .runtime import ProgressFactory, compression_stats, resolve_device, silent_progress
from .stages import compression_report, factorize_and_train
from .train import TrainingHistory, clean_accuracy

log = logging.getLogger(__name__)


@dataclass
class CompressionResult:
    """The compressed model and what happened to it."""

    model: nn.Module
    factorization: FactorizationReport
    history: TrainingHistory
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def ranks(self) -> dict[str, list[int]]:
        return {n: list(l.ranks) for n, l in low_rank_layers(self.model).items()}

    @property
    def compression_rate(self) -> float:
        return compression_stats(self.model).rate


def resolve_recipe(recipe: Recipe | str | Path | dict | None, overrides: dict | list | None = None) -> Recipe:
    """A Recipe from a Recipe, a YAML path, a dict or None (defaults), with overrides applied."""
    if isinstance(recipe, Recipe):
        return recipe_from_dict(apply_overrides(recipe.model_dump(mode="json"), overrides))
    if recipe is None or isinstance(recipe, dict):
        return recipe_from_dict(apply_overrides(recipe or {}, overrides))
    if isinstance(recipe, (str, Path)):
        return load_recipe(recipe, overrides)
    raise ConfigError(f"recipe must be a Recipe, a YAML path or a dict, got {type(recipe).__name__}")


def compress(
    model: nn.Module,
    loader: Iterable,
    beta: float | None = None,
    *,
    val_loader: Iterable | None = None,
    recipe: Recipe | str | Path | dict | None = None,
    overrides: dict[str, Any] | list[str] | None = None,
    device: str | torch.device | None = None,
    progress: ProgressFactory = silent_progress,
    checkpoint_path: str | Path | None = None,
    resume: bool = False,
    inplace: bool = False,
    teacher: nn.Module | None = None,
) -> CompressionResult:
    """Compress a trained classifier with RobustDLRT.

    Args:
        model: any ``nn.Module`` classifier (logits out). Not modified unless ``inplace``.
        loader: training batches ``(inputs, labels)`` (a DataLoader).
        beta: spectral regularizer strength β (0 = plain DLRT). None (the default): the
            recipe's ``train.beta`` (after ``overrides``), which is 0.075 in the built-in
            recipe; a number given here wins over both the recipe and ``overrides``.
        val_loader: if given, clean accuracy before/after and per epoch.
        recipe: a Recipe, YAML path or dict (defaults: the built-in recipe); ``overrides``
            as ``{"train.tau": 0.05}`` or ``["train.tau=0.05"]``.
        device: "cpu", "cuda", ... (default: the recipe's, auto = CUDA if available).
        checkpoint_path / resume: checkpoint every epoch and continue a killed run.
        teacher: the model ``train.distill`` distills from (moved to the device, put in eval
            mode, never trained). None: a frozen copy of ``model`` taken before it is
            factorized. Used only when ``train.distill.weight > 0``; otherwise no copy is made.

    Returns:
        CompressionResult with ``.model`` (factorized, trained), ``.ranks``,
        ``.compression_rate`` and ``.report`` (ranks, κ, compression rate, history).
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not hasattr(loader, "__iter__") or not hasattr(loader, "__len__"):
        raise ConfigError(f"loader must be a DataLoader (iterable with a length), got {type(loader).__name__}")
    if beta is not None and (isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta >= 0):
        raise ConfigError(f"beta must be a number >= 0 or None (the recipe's), got {beta!r}")
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise ConfigError(f"teacher must be a torch.nn.Module, got {type(teacher).__name__}")
    if len(loader) == 0:
        raise ConfigError("loader is empty: it yields no batches")
    extra: dict[str, Any] = {} if beta is None else {"train.beta": float(beta)}
    if device is not None:
        extra["train.device"] = str(device)
    if isinstance(overrides, dict):
        extra = {**overrides, **extra}
    elif overrides:
        recipe = resolve_recipe(recipe, overrides)
    rec = resolve_recipe(recipe, extra)
    dev = resolve_device(rec.train.device)
    if rec.train.distill.weight > 0:
        teacher = teacher if teacher is not None else _frozen_copy(model)  # before `work` is factorized
    elif teacher is not None:
        log.warning("a teacher was given but train.distill.weight is 0: it is not used")
        teacher = None
    work = model if inplace else copy.deepcopy(model)
    work.to(dev)

    dense_params = sum(p.numel() for p in work.parameters())
    dense_acc = clean_accuracy(work, val_loader, dev) if val_loader is not None else None
    fact, history, timings = factorize_and_train(
        work,
        loader,
        rec,
        val_loader=val_loader,
        device=dev,
        checkpoint_path=checkpoint_path,
        resume=resume,
        progress=progress,
        teacher=teacher,
    )
    comp_acc = clean_accuracy(work, val_loader, dev) if val_loader is not None else None
    report = compression_report(
        work,
        fact,
        history,
        rec,
        dense={"params": dense_params, "clean_accuracy": dense_acc},
        compressed={"clean_accuracy": comp_acc},
        timings=timings,
    )
    return CompressionResult(work, fact, history, report)


def _frozen_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode whose parameters take no gradients: the default teacher."""
    teacher = copy.deepcopy(model).eval()
    teacher.requires_grad_(False)
    return teacher
