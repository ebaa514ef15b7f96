"""Reading and writing recipes: YAML through a safe loader, `--set` overrides, validation errors
as one line naming the bad key, and the keys two recipe documents differ in (for ``--resume``)."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..errors import ConfigError
from .schema import Recipe


class _SafeLoader(yaml.SafeLoader):
    """yaml.safe_load's loader (no object construction), reading floats as YAML 1.2 does.

    PyYAML implements YAML 1.1, where ``1e-3`` (no dot) is the *string* "1e-3": ``--set
    train.lr=1e-3`` would be refused as "not a number". This loader also reads exponent-only
    floats as floats; everything else resolves as in yaml.safe_load.
    """


class _SafeDumper(yaml.SafeDumper):
    """yaml.safe_dump's dumper, quoting strings that :class:`_SafeLoader` would read as floats
    (a run named ``1e3`` is written ``'1e3'``), so that a saved recipe reads back unchanged."""


_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
for _cls in (_SafeLoader, _SafeDumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789."))


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_SafeLoader)  # noqa: S506 (a SafeLoader subclass: safe)


_UNION_TAGS = frozenset({"int", "float", "str", "bool", "none", "list", "dict"})


def _key_path(loc: tuple[Any, ...]) -> str:
    """The dotted recipe key of a pydantic error location, without pydantic's union-member tags
    (``factorize.init_rank.int`` → ``factorize.init_rank``)."""
    parts = [
        p if isinstance(p, str) and p.isprintable() else str(p) if isinstance(p, int) else repr(p)
        for p in loc
        if not (isinstance(p, str) and (p in _UNION_TAGS or "[" in p))
    ]
    return ".".join(parts) or "<root>"


def _format_validation_error(err: ValidationError, source: str) -> str:
    """One line: the first bad key, what is wrong (every union member's complaint), the value given."""
    errors = err.errors()
    path = _key_path(errors[0]["loc"])
    same = [e for e in errors if _key_path(e["loc"]) == path]
    if errors[0]["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling; see docs/recipes.md for the valid keys)"
    else:
        msgs = list(dict.fromkeys(e["msg"] for e in same))
        lead = "Input should be "
        msg = " or ".join([msgs[0]] + [m[len(lead) :] if m.startswith(lead) else m for m in msgs[1:]])
        value = errors[0].get("input")
        if value is None or isinstance(value, (bool, int, float, str)):
            shown = repr(value)
            msg += f" (got {shown if len(shown) <= 60 else shown[:57] + '...'})"
    paths = {_key_path(e["loc"]) for e in errors} - {path}
    more = f" (and {len(paths)} more bad key(s))" if paths else ""
    return f"{source}: invalid recipe key '{path}': {msg}{more}"


def recipe_from_dict(doc: Any, source: str = "recipe") -> Recipe:
    """Validate a parsed document; raises ConfigError naming the first bad key."""
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: a recipe must be a YAML mapping of sections, got {type(doc).__name__}")
    try:
        return Recipe.model_validate(doc)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def load_recipe_dict(path: str | Path) -> dict[str, Any]:
    """Read a recipe YAML file with a yaml.SafeLoader (never arbitrary object construction)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe file not found: {p} (give a path such as recipes/robust.yaml)")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read recipe {p}: {err}") from None
    try:
        doc = _yaml_load(text)
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise ConfigError(f"recipe {p} is not valid YAML{where}: fix the syntax") from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError(f"recipe {p}: must be a YAML mapping of sections, got {type(doc).__name__}")
    return doc


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse one ``key.path=value`` override; the value is read as YAML (so 0.1, true, [1,2])."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set train.beta=0.1")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: empty key; expected e.g. train.beta=0.1")
    try:
        value = _yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML") from None
    return key.split("."), value


def apply_overrides(doc: dict[str, Any], overrides: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """Return a copy of ``doc`` with overrides applied (``["a.b=1"]`` or ``{"a.b": 1}``)."""
    doc = copy.deepcopy(doc)
    if not overrides:
        return doc
    items: list[tuple[list[str], Any]]
    if isinstance(overrides, dict):
        items = [(str(k).split("."), v) for k, v in overrides.items()]
    else:
        items = [parse_override(o) for o in overrides]
    for path, value in items:
        node = doc
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {'.'.join(path)}: '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return doc


def load_recipe(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> Recipe:
    """Load (or default), apply overrides, validate."""
    doc = load_recipe_dict(path) if path is not None else {}
    source = str(path) if path is not None else "recipe"
    return recipe_from_dict(apply_overrides(doc, overrides), source=source)


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.dump(recipe.model_dump(mode="json"), Dumper=_SafeDumper, sort_keys=False)


_ABSENT = object()  # a key missing from one of the documents compared by recipe_differences


def recipe_differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two recipe documents (nested mappings).

    Lists (the attacks) are compared whole; a key present in one document only differs, even
    when its value is null (absent means "the default", which need not be null). Used by
    ``--resume`` to name what changed.
    """
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in list(a) + [k for k in b if k not in a]:
            out += recipe_differences(a.get(key, _ABSENT), b.get(key, _ABSENT), f"{prefix}{key}.")
        return out
    return [] if a == b and type(a) is type(b) else [prefix.rstrip(".") or "<root>"]
