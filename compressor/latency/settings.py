"""What a measured latency depends on besides the layer: the machine, the runtime and how it is run."""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

PRECISIONS = ("fp32", "int8")

FORMAT_VERSION = 7
"""Version of how tables are measured and stored: a change of method makes old entries stale."""


@dataclass(frozen=True)
class LatencySettings:
    """How the model is timed: onnxruntime CPU sessions with ``threads`` intra-op threads (one
    inter-op thread, sequential, as the export's latency check runs them), ``batch`` images of
    ``in_chans`` × ``input_size``², in ``precision`` (fp32, or int8: static QDQ graphs)."""

    batch: int = 32
    threads: int = 2
    input_size: int = 32
    in_chans: int = 3
    precision: str = "fp32"

    def __post_init__(self) -> None:
        for key in ("batch", "threads", "input_size", "in_chans"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"latency settings: {key} must be a positive int, got {value!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"latency settings: precision must be one of {PRECISIONS}, got {self.precision!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def context(self) -> dict[str, Any]:
        """The cache key's common part: what changes every figure of a table (the machine's CPU,
        onnxruntime's version, threads, batch, precision); the input size is in each layer's
        key and in the model's."""
        return {
            "format": FORMAT_VERSION,
            "cpu": cpu_model(),
            "onnxruntime": onnxruntime_version(),
            "threads": self.threads,
            "batch": self.batch,
            "precision": self.precision,
        }


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo's 'model name', else platform.processor(), else
    the machine type): tables measured on one CPU are not used on another."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def onnxruntime_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


__all__ = ["FORMAT_VERSION", "PRECISIONS", "LatencySettings", "cpu_model", "onnxruntime_version"]
