"""Progress reporting: library code calls a factory; the CLI passes tqdm, everyone else gets silence."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol


class Progress(Protocol):
    def update(self, n: int = 1) -> Any: ...
    def set_postfix(self, values: dict[str, Any]) -> Any: ...
    def close(self) -> Any: ...


ProgressFactory = Callable[[int, str], Progress]
"""``factory(total, description)`` → a :class:`Progress` (``tqdm`` has this shape)."""


class _Silent:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, values: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


def silent_progress(total: int, desc: str) -> Progress:
    """Default progress factory: library code reports nothing; the CLI passes tqdm."""
    return _Silent()
