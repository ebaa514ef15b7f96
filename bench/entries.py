"""A bench script's finished entries, resumable: ``<checkpoint-dir>/entries.json`` after each one.

The file records the settings that shape the results (the fingerprint); a rerun with other
settings is refused rather than mixing entries, and a rerun with the same ones skips what is done.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from pathlib import Path
from typing import Any

from compressor.atomic import write_text
from compressor.runtime import dumps

log = logging.getLogger(__name__)


class EntryStore:
    """Entries keyed by the values of ``keys`` (e.g. seed, arm); without a folder, in memory only."""

    def __init__(self, folder: str | Path | None, fingerprint: dict[str, Any], keys: tuple[str, ...]) -> None:
        self.entries: list[dict[str, Any]] = []
        self.dir = Path(folder) if folder else None
        self.fp, self.keys = fingerprint, keys
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "entries.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("fingerprint") != self.fp:
                diff = sorted(k for k in self.fp if saved.get("fingerprint", {}).get(k) != self.fp[k])
                raise SystemExit(
                    f"{path} was made with other settings ({', '.join(diff)}): use another --checkpoint-dir"
                )
            self.entries = saved["entries"]
            log.info("checkpoint: %d finished entries in %s", len(self.entries), path)

    def get(self, *key: Any) -> dict[str, Any] | None:
        return next((e for e in self.entries if tuple(e[k] for k in self.keys) == key), None)

    def add(self, entry: dict[str, Any]) -> None:
        entry["measured_at"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        entry["load_avg"] = round(os.getloadavg()[0], 2)
        self.entries.append(entry)
        if self.dir is not None:
            write_text(self.dir / "entries.json", dumps({"fingerprint": self.fp, "entries": self.entries}))

    def weights(self, seed: int) -> Path | None:
        """Where a seed's dense weights are cached (None without a folder)."""
        return self.dir / f"dense-seed{seed}.pt" if self.dir else None
