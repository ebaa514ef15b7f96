"""Local weight files: read a ``.safetensors``/``.pth`` state dict and load it strictly into a net."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import WeightsError
from ._messages import _short
from .heads import find_head

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES: tuple[str, ...] = (".safetensors", ".pth", ".pt", ".bin")

# keys a checkpoint dict may nest its state dict under (tried in this order)
_NESTED_KEYS = ("state_dict", "model", "model_state_dict")
# prefixes added by DistributedDataParallel / torch.compile; stripped before matching
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a local state dict: ``.safetensors`` or ``.pth``/``.pt``/``.bin`` (weights_only).

    A ``.pth`` may hold the state dict itself or a dict with it under "state_dict", "model" or
    "model_state_dict". Raises WeightsError (missing, unreadable, corrupt, not a state dict).
    """
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"weights file not found: {p} (give an existing .safetensors/.pth file in model.weights)")
    suffix = p.suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise WeightsError(
            f"weights file {p}: unsupported extension {suffix or '(none)'}; use one of {', '.join(WEIGHT_SUFFIXES)}"
        )
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(p), device="cpu")
        else:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as err:
        hint = "re-save it with torch.save(model.state_dict(), path) or safetensors.torch.save_file"
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            # torch's own text is long and styled; the point is that nothing in it was run
            raise WeightsError(
                f"cannot read weights file {p}: it holds Python objects, not only tensors (refused: "
                f"unpickling them could run code); {hint}"
            ) from None
        raise WeightsError(f"cannot read weights file {p} (corrupt or truncated? {_short(err)}): {hint}") from None
    if isinstance(obj, dict):
        for key in _NESTED_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise WeightsError(
            f"weights file {p} does not hold a state dict (got {type(obj).__name__}): save model.state_dict()"
        )
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(
            f"weights file {p} is not a state dict: {len(bad)} entries are not tensors (e.g. {bad[0]!r}); "
            "save model.state_dict() or nest it under 'state_dict'"
        )
    return dict(obj)


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def _split_wrapper(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """State dict of a NormalizedClassifier (``mean``, ``std``, ``net.*``) → (net state, {mean, std})."""
    state = _strip_prefixes(state)
    norm_keys = {"mean", "std"}
    if any(k.startswith("net.") for k in state) and all(k.startswith("net.") or k in norm_keys for k in state):
        net_state = _strip_prefixes({k[4:]: v for k, v in state.items() if k.startswith("net.")})
        return net_state, {k: v for k, v in state.items() if k in norm_keys}
    return state, {}


def _names(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def load_net_weights(net: nn.Module, path: str | Path, head: str | None = None) -> tuple[str, dict[str, torch.Tensor]]:
    """Load a weight file into ``net`` (the bare network, not the wrapper), strictly.

    Keys may be for the bare net or for a :class:`NormalizedClassifier` (``net.`` prefix; its
    ``mean``/``std`` are returned). Head entries that are missing or have another number of
    classes are skipped (logged): the head keeps its fresh init. Any other missing, unexpected
    or wrongly shaped entry raises WeightsError. Returns (description, {mean, std} from the file).
    """
    p = Path(path)
    state, norm = _split_wrapper(read_state_dict(p))
    if head is None:
        head = find_head(net)[0]
    head_prefix = head + "." if head else ""
    own = net.state_dict()

    def in_head(k: str) -> bool:
        return bool(head_prefix) and k.startswith(head_prefix)

    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    head_skipped = [k for k in missing + wrong if in_head(k)]
    missing = [k for k in missing if not in_head(k)]
    wrong_body = [k for k in wrong if not in_head(k)]
    if missing or unexpected or wrong_body:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_names(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_names(unexpected)})")
        if wrong_body:
            k = wrong_body[0]
            parts.append(
                f"{len(wrong_body)} with another shape "
                f"({k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)})"
            )
        raise WeightsError(
            f"weights file {p} does not match the model: {'; '.join(parts)}; "
            "check model.name (and input_size for ViTs) or re-save the weights from this architecture"
        )
    load = {k: v for k, v in state.items() if k not in head_skipped}
    try:
        net.load_state_dict(load, strict=False)
    except RuntimeError as err:
        raise WeightsError(f"cannot load weights file {p}: {_short(err)}") from None
    desc = f"file:{p}"
    if head_skipped:
        log.info("weights %s: classifier head %r left at fresh init (%s)", p, head, _names(head_skipped))
        desc += f" (head {head} fresh: the file's head has another shape or is absent)"
    return desc, norm
