"""Measurements several scripts make the same way: the dense start of every arm (trained once,
its weights cached), accuracy under attack and sizes."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import lib

log = logging.getLogger(__name__)
EPS_L2 = [0.05, 0.1, 0.3]  # ℓ2-FGSM, pixel units (the paper's Table 5)
PGD_EPS = 8 / 255  # ℓ∞, pixel units
# the paper's attacks (Table 5): their ε, and their names in a table
PAPER_EPS = {"l2_fgsm": EPS_L2, "jitter": [0.035, 0.045], "mixup": [0.025, 0.1, 0.75], "pgd": [PGD_EPS]}
ATTACK_LABELS = {"l2_fgsm": "ℓ2-FGSM", "jitter": "Jitter", "mixup": "Mixup", "pgd": "PGD-ℓ∞"}


def save_weights(model: nn.Module, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with lib.atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)


def dense_weights(
    model: nn.Module, loader, section, *, seed: int, cache: Path | None = None, reuse=True, device="cpu", **trainer
) -> tuple[Any, float | None]:
    """``model`` trained by ``section`` (a BaselineSection; the RNG seeded ``seed + 1``), or its
    weights restored from ``cache`` when ``reuse`` and the file exists; trained weights are saved
    there. ``trainer``: more Trainer arguments (name, val_loader). Returns (history or None,
    training seconds or None when restored)."""
    if cache is not None and reuse and cache.is_file():
        model.load_state_dict(torch.load(cache, map_location=device, weights_only=True))
        log.info("dense weights restored from %s", cache)
        return None, None
    log.info("dense: %d epoch(s) of %d batches", section.epochs, len(loader))
    t0 = time.perf_counter()
    torch.manual_seed(seed + 1)
    fit = lib.Trainer(model, loader, section, seed=seed, device=device, set_epoch=lib.set_epoch, **trainer).fit
    history = fit() if section.epochs else None
    seconds = time.perf_counter() - t0
    if cache is not None:
        save_weights(model, cache)
    return history, seconds


def robustness(model: nn.Module, loader, *, samples: int | None, seed: int, pgd_steps=0, device="cpu") -> dict:
    """Clean accuracy, ℓ2-FGSM accuracy per ε (``EPS_L2``) and, with ``pgd_steps``, PGD-ℓ∞ 8/255
    accuracy, on the first ``samples`` held-out images (the attacks' draws seeded by ``seed``)."""
    attacks: list[dict[str, Any]] = [{"name": "l2_fgsm", "eps": EPS_L2}]
    if pgd_steps:
        attacks.append({"name": "pgd", "eps": [PGD_EPS], "options": {"steps": pgd_steps}})
    res = lib.evaluate(model, loader, attacks=attacks, max_samples=samples, seed=seed, device=device)
    out = {"clean": res.clean_accuracy, "l2_fgsm": res.adversarial_accuracy["l2_fgsm"]}
    if pgd_steps:
        out["pgd"] = next(iter(res.adversarial_accuracy["pgd"].values()))
    return {**out, "n_eval": res.n_clean, "n_attacked": res.n_attacked}


def sizes(model: nn.Module, input_size: int | None = None) -> dict[str, Any]:
    """Parameters against the dense equivalent, c.r. (%) and, with ``input_size``, multiply-adds."""
    stats = lib.compression_stats(model)
    out = {"params": stats.params, "params_dense": stats.params_dense}
    out.update(params_fraction=stats.params / stats.params_dense, compression_rate=stats.rate)
    if input_size:
        macs, dense = lib.count_macs(model, input_size), lib.count_macs(model, input_size, dense_equivalent=True)
        out.update(macs=macs, macs_dense=dense, macs_fraction=macs / dense)
    return out


def sync(device: torch.device) -> None:
    """Wait for a CUDA device's queued work (a time stamp counts only what finished before it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ranks(model: nn.Module) -> dict[str, list[int]]:
    return {n: list(layer.ranks) for n, layer in lib.low_rank_layers(model).items()}


def slim(history, *keys: str) -> list[dict[str, Any]]:
    """The epochs of a training history (a History or its dict), only ``keys``."""
    epochs = (history if isinstance(history, dict) else history.to_dict()).get("epochs", [])
    return [{k: e.get(k) for k in keys} for e in epochs]
