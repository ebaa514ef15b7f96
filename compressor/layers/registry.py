"""The registered factorized layer types: ``kind`` (the name a safetensors manifest records) →
class, and which dense modules each one factorizes. Registration order is the order in which
a dense module's candidate types are tried."""

from __future__ import annotations

from torch import nn

from .base import LowRankLayer

_TYPES: dict[str, type[LowRankLayer]] = {}


def register_layer_type(cls: type[LowRankLayer]) -> type[LowRankLayer]:
    """Make ``cls`` known by its ``kind`` (to loading, factorization and reports); returns it."""
    if not (isinstance(cls, type) and issubclass(cls, LowRankLayer)) or not cls.kind:
        raise TypeError(f"{cls!r} is not a LowRankLayer subclass with a kind")
    known = _TYPES.get(cls.kind)
    if known is not None and known is not cls:
        raise ValueError(f"layer kind {cls.kind!r} is taken by {known.__qualname__}")
    _TYPES[cls.kind] = cls
    return cls


def unregister_layer_type(kind: str) -> None:
    """Forget ``kind`` (for tests that register a type of their own)."""
    _TYPES.pop(kind, None)


def layer_kinds() -> tuple[str, ...]:
    """The registered kinds, in registration order."""
    return tuple(_TYPES)


def layer_type(kind: str) -> type[LowRankLayer]:
    """The class registered as ``kind``; KeyError naming the known kinds otherwise."""
    try:
        return _TYPES[kind]
    except KeyError:
        raise KeyError(f"unknown layer kind {kind!r} (expected {' or '.join(map(repr, _TYPES))})") from None


def layer_type_for(module: nn.Module) -> type[LowRankLayer] | None:
    """The first registered type that factorizes ``module`` (an instance of its ``dense_type``);
    None for a module no type replaces or one that is factorized already."""
    if isinstance(module, LowRankLayer):
        return None
    return next((cls for cls in _TYPES.values() if isinstance(module, cls.dense_type)), None)
