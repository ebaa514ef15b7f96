"""Training checkpoints: written atomically, read without unpickling arbitrary objects.

A checkpoint holds everything needed to continue bit-for-bit on the same machine: the model
(factors, cores, ranks), optimizer state, schedule, RNG states, the next epoch (batch order of
an epoch is a pure function of seed and epoch), the history so far and the event counters.
Checkpoints are taken at epoch ends, where no layer is in its augmented state.
:class:`CheckpointWriter` writes them in the background while training goes on.
"""

from __future__ import annotations

import copy
import logging
import random
import threading
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_path
from ..errors import WeightsError

FORMAT = 1

log = logging.getLogger(__name__)


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
        raise WeightsError(
            f"checkpoint {path} is not a compressor checkpoint (format {FORMAT}); delete it to start over"
        )
    return payload


def _detached_copy(value: Any) -> Any:
    """A copy of a payload that later training steps cannot change: tensors copied to CPU memory."""
    if torch.is_tensor(value):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _detached_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_detached_copy(v) for v in value)
    return copy.deepcopy(value)


class CheckpointWriter:
    """Writes checkpoints in a background thread, so that training goes on meanwhile.

    A dense-baseline checkpoint holds the weights and both Adam moments (1.6 GB for VGG16), and
    writing it would otherwise stall training once an epoch; the next epoch's compute hides it. The payload
    is copied to CPU memory before :meth:`submit` returns, so what is written is the state at
    the call. One write at a time (a submit waits for the previous one); a write that failed is
    raised by the next :meth:`submit` or :meth:`wait`. Each file is written as by
    :func:`save_checkpoint`: atomically, so a kill mid-write leaves the previous checkpoint.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, path: str | Path, payload: dict[str, Any]) -> None:
        self.wait()
        snapshot = _detached_copy(payload)
        # not a daemon: an interpreter exit waits for the file instead of leaving a temporary one
        self._thread = threading.Thread(target=self._write, args=(Path(path), snapshot), name="checkpoint-writer")
        self._thread.start()

    def _write(self, path: Path, payload: dict[str, Any]) -> None:
        try:
            save_checkpoint(path, payload)
        except BaseException as err:  # handed to the training thread at its next submit/wait
            self._error = err

    def wait(self, *, raise_error: bool = True) -> None:
        """Block until the last submitted checkpoint is on disk; raise its error if it failed
        (``raise_error=False``, while another exception propagates: log it instead)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            if raise_error:
                raise error
            log.error("writing a checkpoint failed: %s", error)
