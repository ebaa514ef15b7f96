"""Where work runs: device resolution and mixed precision."""

from __future__ import annotations

import contextlib

import torch

from ..errors import ConfigError


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``, checked."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ConfigError(f"train.device {spec!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):  # meta, mps, xpu, ...: not what training runs on here
        raise ConfigError(
            f"train.device {spec!r}: {device.type} devices are not supported; use auto, cpu, cuda or cuda:N"
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device {spec!r}: CUDA is not available here; use auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"train.device {spec!r}: there are only {torch.cuda.device_count()} CUDA devices "
            f"(cuda:0 … cuda:{torch.cuda.device_count() - 1})"
        )
    return device


def autocast_context(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA ('auto' or 'bf16'); plain float32 on the CPU unless 'bf16' is asked."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
