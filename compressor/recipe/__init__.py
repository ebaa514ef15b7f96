"""Typed, validated recipes.

A recipe is a YAML document whose sections mirror the pipeline stages
(model → data → baseline → factorize → train → evaluate → export). Unknown keys and wrong
types fail with the key's dotted path; `--set key=value` overrides any key; the resolved recipe
is saved beside the outputs (like timm's ``args.yaml``).

``schema`` holds the sections, ``yaml_io`` reading, overrides and writing, ``reference`` the
generated docs/recipes.md.
"""

from .reference import reference_markdown
from .schema import (
    MAX_SEED,
    AdversarialSection,
    AttackSpec,
    BaselineSection,
    DataSection,
    DistillSection,
    EvaluateSection,
    ExportSection,
    FactorizeSection,
    ModelSection,
    OptimSection,
    Recipe,
    TargetSection,
    TrainSection,
)
from .yaml_io import (
    _SafeDumper,
    apply_overrides,
    load_recipe,
    load_recipe_dict,
    parse_override,
    recipe_differences,
    recipe_from_dict,
    recipe_to_yaml,
)

__all__ = [
    "MAX_SEED",
    "AdversarialSection",
    "AttackSpec",
    "BaselineSection",
    "DataSection",
    "DistillSection",
    "EvaluateSection",
    "ExportSection",
    "FactorizeSection",
    "ModelSection",
    "OptimSection",
    "Recipe",
    "TargetSection",
    "TrainSection",
    "_SafeDumper",
    "apply_overrides",
    "load_recipe",
    "load_recipe_dict",
    "parse_override",
    "recipe_differences",
    "recipe_from_dict",
    "recipe_to_yaml",
    "reference_markdown",
]
