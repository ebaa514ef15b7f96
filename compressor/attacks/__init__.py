"""Adversarial attacks on [0, 1] images, one attack a file (torchattacks-style).

>>> atk = create_attack("pgd", model, eps=8 / 255, steps=10)
>>> adv = atk(images, labels)

Every attack takes the common options of :class:`~compressor.attacks.base.Attack`
(``eps_unit``, ``std``, ``round_8bit``, ``seed``) plus its own keyword options.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from ..errors import ConfigError, unknown_name
from .base import _REGISTRY, Attack, register_attack

# importing the modules registers the attacks
from . import apgd, fgsm, jitter, l1_fgsm, l2_fgsm, mixup, pgd  # noqa: E402,F401  isort: skip

__all__ = ["Attack", "attack_options", "create_attack", "list_attacks", "register_attack"]


def list_attacks() -> list[str]:
    """Names accepted by :func:`create_attack`, sorted."""
    return sorted(_REGISTRY)


def attack_options(name: str) -> dict[str, Any]:
    """The keyword options of attack ``name`` (its own and the common ones) with defaults."""
    if name not in _REGISTRY:
        raise unknown_name("attack", name, list_attacks())
    opts: dict[str, Any] = {}
    for klass in reversed(_REGISTRY[name].__mro__):
        init = klass.__dict__.get("__init__")
        if init is None or not issubclass(klass, Attack):
            continue
        for p in inspect.signature(init).parameters.values():
            if p.kind is p.KEYWORD_ONLY or (
                p.kind is p.POSITIONAL_OR_KEYWORD and p.name not in ("self", "model", "eps")
            ):
                opts[p.name] = p.default
    return opts


def create_attack(name: str, model: nn.Module, eps: float | None = None, **options: Any) -> Attack:
    """Build attack ``name`` on ``model`` with radius ``eps`` (in ``eps_unit`` units).

    ``eps=None`` takes the attack's documented default (8/255 for fgsm, pgd, apgd; the
    paper's middle values for l2_fgsm, l1_fgsm, jitter, mixup).

    Raises:
        UnknownNameError: ``name`` is not registered (the message lists the valid names).
        ConfigError: an option is unknown or has an invalid value.
    """
    valid = attack_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(
            f"unknown option {unknown[0]!r} for attack {name!r}. Valid options: {', '.join(sorted(valid))}"
        )
    if eps is None:
        default = inspect.signature(_REGISTRY[name].__init__).parameters["eps"].default
        eps = 8 / 255 if default is inspect.Parameter.empty else default
    try:
        return _REGISTRY[name](model, eps, **options)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:  # e.g. a list or a word where a number is expected
        raise ConfigError(f"attack {name!r}: invalid option value ({err})") from None
