"""A recipe section with keyword shortcuts applied, validated as the recipe validates it.

Functions configured by a recipe section (``export_model(model, folder, recipe.export)``,
``evaluate(model, loader, recipe.evaluate)``) also take the section's keys as keyword
shortcuts (``export_model(model, folder, opset=17)``). Both go through :func:`resolve_section`,
so defaults, bounds and error messages (with the key's dotted path) live only in
:mod:`compressor.recipe`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel

from .errors import ConfigError
from .recipe import Recipe, recipe_from_dict

S = TypeVar("S", bound=BaseModel)


def _recipe_key(cls: type[BaseModel]) -> str:
    """The recipe key whose section has type ``cls`` (``ExportSection`` → ``export``)."""
    for key, field in Recipe.model_fields.items():
        if field.annotation is cls:
            return key
    raise TypeError(f"{cls.__name__} is not a top-level recipe section")


def resolve_section(cls: type[S], section: S | None, options: Mapping[str, Any], *, source: str) -> S:
    """``section`` (default: ``cls()``, the recipe's defaults) with ``options`` applied and checked.

    Raises ConfigError naming the first bad key (``export.opset``), as a recipe file would.
    """
    key = _recipe_key(cls)
    if section is not None and not isinstance(section, cls):
        raise ConfigError(
            f"{source}: expected a {cls.__name__} (a recipe's {key} section), got {type(section).__name__}"
        )
    if not options:
        return section if section is not None else cls()
    base = section.model_dump() if section is not None else {}
    return getattr(recipe_from_dict({key: {**base, **options}}, source=source), key)
