"""A bench script's finished entries, resumable: ``<checkpoint-dir>/entries.json`` after each one.

The file records the settings that shape the results (the fingerprint); a rerun with other
settings is refused rather than mixing entries, and a rerun with the same ones skips what is done.
Processes may share a folder (``bench_decision.py --jobs``): each addition is merged into the
file's current entries under a lock, so no process overwrites another's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

from .lib import dumps, write_text

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

    @classmethod
    def of(cls, args: argparse.Namespace, fingerprint: tuple[str, ...], keys: tuple[str, ...]) -> EntryStore:
        """The store of ``--checkpoint-dir``, fingerprinted by the options named in ``fingerprint``."""
        return cls(args.checkpoint_dir, {k: getattr(args, k) for k in fingerprint}, keys)

    def get(self, *key: Any) -> dict[str, Any] | None:
        return next((e for e in self.entries if tuple(e[k] for k in self.keys) == key), None)

    def missing(self, *keys: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """The keys among ``keys`` that have no entry yet."""
        return [k for k in keys if self.get(*k) is None]

    def add(self, entry: dict[str, Any]) -> None:
        entry["measured_at"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        entry["load_avg"] = round(os.getloadavg()[0], 2)
        self.entries.append(entry)
        if self.dir is None:
            return
        path = self.dir / "entries.json"
        with open(self.dir / "entries.lock", "w") as lock:  # released when it closes
            fcntl.flock(lock, fcntl.LOCK_EX)
            saved = json.loads(path.read_text())["entries"] if path.is_file() else []
            mine = {self._key(e) for e in self.entries}  # another process's entries, added since, are kept
            self.entries = [e for e in saved if self._key(e) not in mine] + self.entries
            write_text(path, dumps({"fingerprint": self.fp, "entries": self.entries}))

    def _key(self, entry: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(entry.get(k) for k in self.keys)

    def weights(self, tag: Any) -> Path | None:
        """Where a group's dense weights are cached (``tag`` a seed or a name; None without a folder)."""
        if self.dir is None:
            return None
        return self.dir / (f"dense-seed{tag}.pt" if isinstance(tag, int) else f"dense-{tag}.pt")


class Clock:
    """How long the rest of a run should take at its pace so far: per kind of entry, the mean
    seconds of the finished ones times how many are left."""

    def __init__(self, left: dict[str, int]) -> None:
        self.left, self.seconds = dict(left), {}

    def done(self, kind: str, t0: float) -> float:
        """Minutes left, an entry of ``kind`` that started at ``t0`` being finished."""
        self.seconds.setdefault(kind, []).append(time.perf_counter() - t0)
        self.left[kind] -= 1
        return sum(n * statistics.fmean(self.seconds.get(k, [0.0])) for k, n in self.left.items()) / 60
