"""Classes registered by name (attacks, loss terms): the decorator that files one."""

from __future__ import annotations

import logging
from collections.abc import Callable, MutableMapping
from typing import Any, TypeVar

T = TypeVar("T", bound=type)


def registering(table: MutableMapping[str, Any], name: str, what: str, log: logging.Logger) -> Callable[[T], T]:
    """A class decorator that files its class in ``table`` under ``name`` and sets the class's
    ``name``. A second class under a taken name replaces the first, with a warning on ``log``
    (``what`` names the kind of thing: "attack", "loss term")."""

    def deco(cls: T) -> T:
        if name in table and table[name] is not cls:
            log.warning("%s %r re-registered: %s replaces %s", what, name, cls, table[name])
        table[name] = cls
        cls.name = name
        return cls

    return deco
