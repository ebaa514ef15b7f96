"""Preflight: a recipe's inputs checked against what is installed and on disk (model, data set
and attack names, attack options, weight files, data folders, the device) before any long work.

Types, ranges and the relations between keys are the recipe's own validation
(:mod:`compressor.recipe`); this module checks what the recipe cannot know by itself.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError, unknown_name
from .recipe import Recipe
from .runtime import resolve_device


def validate_inputs(recipe: Recipe) -> None:
    """Fail fast with a one-line ConfigError naming the recipe key and how to fix it."""
    from .attacks import attack_options, list_attacks
    from .data import list_datasets
    from .evaluate import check_attacks
    from .models import WEIGHT_SUFFIXES, resolve_name

    resolve_name(recipe.model.name)
    if recipe.model.weights is not None:
        weights = Path(recipe.model.weights)
        if not weights.is_file():
            raise ConfigError(f"model.weights: file not found: {weights} (give a .safetensors or .pth file)")
        if weights.suffix.lower() not in WEIGHT_SUFFIXES:
            raise ConfigError(
                f"model.weights: {weights} has an unsupported extension; use one of {', '.join(WEIGHT_SUFFIXES)}"
            )
    if recipe.data.name not in list_datasets():
        raise unknown_name("data set", recipe.data.name, list_datasets())
    if recipe.data.root is not None and not recipe.data.download:
        root = Path(recipe.data.root).expanduser()
        if not root.exists():
            raise ConfigError(
                f"data.root: {recipe.data.root} does not exist (create it, fix the path, "
                f"or set data.download=true for torchvision data sets)"
            )
        if not root.is_dir():
            raise ConfigError(f"data.root: {recipe.data.root} is a file; give the folder that holds the data set")
    for i, spec in enumerate(recipe.evaluate.attacks):
        if spec.name not in list_attacks():
            raise unknown_name("attack", spec.name, list_attacks())
        valid = attack_options(spec.name)
        for key in spec.options:
            if key not in valid:
                raise ConfigError(
                    f"evaluate.attacks.{i}.options.{key}: unknown option for {spec.name}; "
                    f"valid: {', '.join(sorted(valid)) or 'none'}"
                )
        # built on a stand-in model: a bad option value fails now, not after training
        try:
            check_attacks(
                [spec.model_dump()],
                eps_unit=recipe.evaluate.eps_unit,
                round_8bit=recipe.evaluate.round_8bit,
                seed=recipe.evaluate.seed,
            )
        except ConfigError as err:
            raise ConfigError(f"evaluate.attacks.{i} ({spec.name}): {err}") from None
    resolve_device(recipe.train.device)
