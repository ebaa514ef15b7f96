"""An attack suite: every (attack, ε) of a list of attack specs, built up front on one model.

Built before any image is read, so that a bad name, option or option value fails at once. A
name given twice gets ``#2``, ``#3``... appended to its key; each attack remembers its base
seed, to which the evaluation adds the batch index.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import ConfigError, unknown_name
from . import create_attack, list_attacks
from .base import Attack


@dataclass
class BuiltAttack:
    key: str
    eps: float
    attack: Attack
    seed: int


def _spec_fields(spec: Any) -> tuple[str, list[float], dict[str, Any]]:
    if isinstance(spec, Mapping):
        extra = set(spec) - {"name", "eps", "options"}
        if extra:
            raise ConfigError(f"attack spec: unknown key {sorted(extra)[0]!r} (valid: name, eps, options)")
        name, eps, options = spec.get("name"), spec.get("eps"), spec.get("options") or {}
    else:
        name, eps, options = (getattr(spec, k, None) for k in ("name", "eps", "options"))
        options = options or {}
    if not isinstance(name, str):
        raise ConfigError(f"attack spec needs a 'name' (one of {', '.join(list_attacks())}), got {name!r}")
    if isinstance(eps, (int, float)):
        eps = [eps]
    if not isinstance(eps, Sequence) or len(eps) == 0:
        raise ConfigError(f"attack {name!r}: 'eps' must be a non-empty list of numbers, got {eps!r}")
    if not isinstance(options, Mapping):
        raise ConfigError(f"attack {name!r}: 'options' must be a mapping, got {type(options).__name__}")
    return name, list(dict.fromkeys(float(e) for e in eps)), dict(options)  # dedupe, keep order


def build_suite(
    model: nn.Module, attacks: Iterable[Any], common: Mapping[str, Any]
) -> tuple[list[BuiltAttack], list[dict[str, Any]]]:
    """Every (attack, ε) of ``attacks`` (dicts or objects with ``name``, ``eps``, ``options``)
    on ``model``, with the ``common`` options of every attack (``eps_unit``, ``std``,
    ``round_8bit``, ``seed``) under each spec's own; and each spec as the report describes it."""
    built, described, seen = [], [], {}
    for spec in attacks:
        name, eps_list, options = _spec_fields(spec)
        if name not in list_attacks():
            raise unknown_name("attack", name, list_attacks())
        seen[name] = seen.get(name, 0) + 1
        key = name if seen[name] == 1 else f"{name}#{seen[name]}"
        kwargs = {**common, **options}
        for e in eps_list:
            built.append(BuiltAttack(key, e, create_attack(name, model, eps=e, **kwargs), int(kwargs["seed"])))
        described.append({"key": key, "name": name, "eps": eps_list, "options": options})
    return built, described
