"""Exceptions that carry a message meant for the user.

Library code raises these; only the CLI turns them into one line on stderr and exit code 2.
Every message says what is wrong *and* how to fix it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class CompressorError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""


class ConfigError(CompressorError, ValueError):
    """A recipe, option or argument is invalid (unknown key, wrong type, out of range)."""


class UnreachableTargetError(ConfigError):
    """``train.target`` is below what the model can reach; ``floor``: the reachable fraction of dense."""

    def __init__(self, message: str, floor: float) -> None:
        super().__init__(message)
        self.floor = floor


class UnknownNameError(ConfigError, KeyError):
    """An unknown model, data set or attack name."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class DataError(CompressorError):
    """A data set is missing, empty or malformed."""


class WeightsError(CompressorError):
    """A weight, checkpoint or exported file is missing, corrupt or does not match the model."""


class OutputError(CompressorError):
    """An output location cannot be written or already holds a run."""


def unknown_name(kind: str, name: str, valid: Iterable[str]) -> UnknownNameError:
    """Build the standard 'unknown X' error with a 'did you mean' hint and the valid names."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    shown = ", ".join(valid[:30]) + (" ..." if len(valid) > 30 else "")
    return UnknownNameError(f"unknown {kind} {name!r}.{hint} Valid names: {shown}")


INPUTS_CHECKED = "compressor_inputs_checked"
"""Attribute of the log record (``log.info(..., extra={INPUTS_CHECKED: True})``) by which the
pipeline and ``export_saved`` say that every input was checked and the long work begins.
The CLI holds log records back until then, so that bad input ends in exactly one line on stderr."""
