"""The on-disk cache of measured latency tables.

One JSON file per entry, named by a hash of its full key (the settings' context — CPU model,
onnxruntime version, threads, batch, precision, format — and the layer's LatencyKey or the
model's fingerprint), holding the key itself beside the figures. An entry is used only when
its stored key equals the key asked for, so a table measured on another CPU, onnxruntime,
thread count, batch or precision is never used: it is measured again. Files are written
atomically (a concurrent or killed run leaves the old file or the new one).

Folder: ``$COMPRESSOR_CACHE_DIR/latency`` when that variable is set, else
``~/.cache/compressor/latency``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import atomic

log = logging.getLogger(__name__)

CACHE_ENV = "COMPRESSOR_CACHE_DIR"
"""Environment variable naming compressor's cache root (the tables go in its ``latency/``)."""


def default_cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "compressor"
    return base / "latency"


def _canonical(key: Mapping[str, Any]) -> str:
    return json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)


class LatencyCache:
    """Entries keyed by a JSON-able mapping (see the module docstring)."""

    def __init__(self, folder: str | Path | None = None) -> None:
        self.folder = Path(folder).expanduser() if folder is not None else default_cache_dir()

    def path(self, key: Mapping[str, Any]) -> Path:
        digest = hashlib.sha256(_canonical(key).encode()).hexdigest()[:24]
        return self.folder / f"{digest}.json"

    def load(self, key: Mapping[str, Any]) -> Any | None:
        """The figures stored under ``key``, or None (absent, unreadable, or stored for another key)."""
        path = self.path(key)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            log.warning("latency cache: %s is unreadable (%s): measuring again", path, err)
            return None
        if not isinstance(doc, dict) or _canonical(doc.get("key", {})) != _canonical(key):
            log.warning("latency cache: %s was stored for another key: measuring again", path)
            return None
        return doc.get("figures")

    def store(self, key: Mapping[str, Any], figures: Any) -> Path:
        path = self.path(key)
        try:
            atomic.write_text(path, json.dumps({"key": key, "figures": figures}, sort_keys=True, default=str))
        except OSError as err:  # a read-only home: the run goes on, the next one measures again
            log.warning("latency cache: cannot write %s (%s); set %s to a writable folder", path, err, CACHE_ENV)
        return path


__all__ = ["CACHE_ENV", "LatencyCache", "default_cache_dir"]
