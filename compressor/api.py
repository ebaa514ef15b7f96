"""The Python entry point: ``compress(model, loader, beta)``.

Factorize a trained classifier and fine-tune it with RobustDLRT; the shared stage
``factorize_and_train`` is also what the ``compress`` command runs after its dense baseline.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError
from .factorize import FactorizationReport, factorize_
from .functional import singular_values, unfold
from .layers import low_rank_layers
from .recipe import Recipe, load_recipe, recipe_from_dict, apply_overrides
from .train import DistContext, Trainer, TrainerConfig, TrainingHistory, clean_accuracy, compression_stats
from .train.checkpoint import CheckpointWriter
from .train.common import ProgressFactory, resolve_device, silent_progress

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


def layer_spectrum(module: nn.Module) -> list[float]:
    """Singular values of a layer's weight (conv: mode-0 unfolding), dense or factorized."""
    if hasattr(module, "core_matrix"):
        return singular_values(module.core_matrix().float()).tolist()
    w = module.weight.detach().float()
    return singular_values(w if w.dim() == 2 else unfold(w, 0)).tolist()


def factorize_and_train(model: nn.Module, train_loader: Iterable, recipe: Recipe, *, val_loader: Iterable | None = None,
                        device: torch.device | None = None, dist: DistContext | None = None,
                        checkpoint_path: str | Path | None = None, resume: bool = False,
                        progress: ProgressFactory = silent_progress,
                        set_epoch: Callable[[Iterable, int], None] | None = None,
                        checkpoint_writer: CheckpointWriter | None = None) -> tuple[FactorizationReport, TrainingHistory, dict[str, float]]:
    """Factorize ``model`` in place (activation-aware or SVD / Tucker-2 bases, ``recipe.factorize``),
    then RobustDLRT. ``checkpoint_writer``: share the caller's background writer, so that its
    earlier checkpoints are on disk before the first RobustDLRT one."""
    device = device or resolve_device(recipe.train.device)
    f = recipe.factorize
    timings: dict[str, float] = {}
    t = time.perf_counter()
    torch.manual_seed(recipe.seed + 2)  # stage-local seeding: a resumed run sees the same RNG here
    model.to(device)  # calibration runs the model; SVDs and QRs run where the training will
    calibration = None
    if f.init == "activations":
        (set_epoch or _generic_set_epoch)(train_loader, 0)  # the first batches of epoch 0, on every process
        calibration = train_loader
    fact = factorize_(model, init_rank=f.init_rank, init_tol=f.init_tol, r_min=f.r_min, r_max=f.r_max,
                      include=f.include, exclude=f.exclude, keep_first_conv=f.keep_first_conv,
                      keep_classifier=f.keep_classifier, calibration=calibration,
                      calibration_batches=f.calibration_batches, dist=dist, seed=recipe.seed)
    timings["factorize"] = time.perf_counter() - t
    if not fact.factorized:
        log.warning("no layer was factorized (see the factorization table); training continues densely")
    t = time.perf_counter()
    trainer = Trainer(model, train_loader, TrainerConfig.from_section(recipe.train), val_loader=val_loader,
                      device=device, seed=recipe.seed, dist=dist, checkpoint_path=checkpoint_path,
                      progress=progress, name="RobustDLRT" if recipe.train.beta > 0 else "DLRT", set_epoch=set_epoch,
                      checkpoint_writer=checkpoint_writer)
    history = trainer.fit(resume=resume)
    timings["train"] = time.perf_counter() - t
    return fact, history, timings


def compress(model: nn.Module, loader: Iterable, beta: float = 0.075, *, val_loader: Iterable | None = None,
             recipe: Recipe | str | Path | dict | None = None, overrides: dict[str, Any] | list[str] | None = None,
             device: str | torch.device | None = None, progress: ProgressFactory = silent_progress,
             checkpoint_path: str | Path | None = None, resume: bool = False,
             inplace: bool = False) -> CompressionResult:
    """Compress a trained classifier with RobustDLRT.

    Args:
        model: any ``nn.Module`` classifier (logits out). Not modified unless ``inplace``.
        loader: training batches ``(inputs, labels)`` (a DataLoader).
        beta: spectral regularizer strength β (0 = plain DLRT); overrides the recipe's.
        val_loader: if given, clean accuracy before/after and per epoch.
        recipe: a Recipe, YAML path or dict (defaults: the built-in recipe); ``overrides``
            as ``{"train.tau": 0.05}`` or ``["train.tau=0.05"]``.
        device: "cpu", "cuda", ... (default: the recipe's, auto = CUDA if available).
        checkpoint_path / resume: checkpoint every epoch and continue a killed run.

    Returns:
        CompressionResult with ``.model`` (factorized, trained), ``.ranks``,
        ``.compression_rate`` and ``.report`` (ranks, κ, compression rate, history).
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not hasattr(loader, "__iter__") or not hasattr(loader, "__len__"):
        raise ConfigError(f"loader must be a DataLoader (iterable with a length), got {type(loader).__name__}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta >= 0:
        raise ConfigError(f"beta must be a number >= 0, got {beta!r}")
    if len(loader) == 0:
        raise ConfigError("loader is empty: it yields no batches")
    extra = {"train.beta": float(beta)}
    if device is not None:
        extra["train.device"] = str(device)
    if isinstance(overrides, dict):
        extra = {**overrides, **extra}
    elif overrides:
        recipe = resolve_recipe(recipe, overrides)
    rec = resolve_recipe(recipe, extra)
    dev = resolve_device(rec.train.device)
    work = model if inplace else copy.deepcopy(model)
    work.to(dev)

    dense_params = sum(p.numel() for p in work.parameters())
    dense_acc = clean_accuracy(work, val_loader, dev) if val_loader is not None else None
    fact, history, timings = factorize_and_train(work, loader, rec, val_loader=val_loader, device=dev,
                                                 checkpoint_path=checkpoint_path, resume=resume, progress=progress,
                                                 set_epoch=_generic_set_epoch)
    result = CompressionResult(work, fact, history)
    stats = compression_stats(work)
    result.report = {
        "dense": {"params": dense_params, "clean_accuracy": dense_acc},
        "compressed": {"params": stats.params, "compression_rate": stats.rate,
                       "clean_accuracy": clean_accuracy(work, val_loader, dev) if val_loader is not None else None,
                       "layers": layer_summary(work)},
        "factorization": fact.to_dict(),
        "history": history.to_dict(),
        "timings": timings,
        "recipe": rec.model_dump(mode="json"),
    }
    return result


def layer_summary(model: nn.Module) -> dict[str, dict[str, Any]]:
    """{layer: {rank, ranks, condition_number, regularizer}} at the current state."""
    out = {}
    with torch.no_grad():
        for name, layer in low_rank_layers(model).items():
            kappa = layer.condition_number()
            out[name] = {"rank": layer.ranks[0] if len(layer.ranks) == 1 else list(layer.ranks),
                         "ranks": list(layer.ranks), "kind": "linear" if len(layer.ranks) == 1 else "conv",
                         "condition_number": kappa if kappa != float("inf") else None,
                         "regularizer": float(layer.regularizer())}
    return out


def _generic_set_epoch(loader: Iterable, epoch: int) -> None:
    """For user loaders: DistributedSampler.set_epoch if there is one; nothing otherwise."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
