"""Training checkpoints: written atomically, read without unpickling arbitrary objects.

A checkpoint holds everything needed to continue bit-for-bit on the same machine: the model
(factors, cores, ranks), optimizer state, schedule, RNG states, the next epoch (batch order of
an epoch is a pure function of seed and epoch), the history so far and the event counters.
Checkpoints are taken at epoch ends, where no layer is in its augmented state.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_path
from ..errors import WeightsError

FORMAT = 1


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    payload = {"format": FORMAT, **payload}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint not found: {path} (nothing to resume; run without --resume)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # corrupt, truncated, or holds non-tensor objects
        reason = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise WeightsError(f"checkpoint {path} cannot be read safely ({reason}); delete it to start over") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise WeightsError(f"checkpoint {path} is not a compressor checkpoint (format {FORMAT}); delete it to start over")
    return payload
