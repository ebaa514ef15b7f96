"""One-line descriptions of library errors, for the messages this package raises."""

from __future__ import annotations


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text[:160]}" if text else type(err).__name__
