"""BatchNorm after rank changes: re-estimated running statistics, and a check that they fit.

Rank-adaptive training changes what every factorized layer outputs, truncation by truncation,
while a BatchNorm's running mean and variance average over all of it: at the end they describe
layers that no longer exist. :func:`reestimate_batchnorm_` recomputes them as a plain average
over a few training batches through the final model (as one would after pruning).

A model whose running statistics do not match its data (never estimated on it, or estimated
under another preprocessing) scores far lower in eval mode than with batch statistics;
:func:`batchnorm_mismatch` measures both on a few batches so that the caller can warn.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from itertools import islice

import torch
from torch import nn

from ..runtime import DistContext
from ..runtime.batches import split_batch

log = logging.getLogger(__name__)

MISMATCH_POINTS = 0.2
"""Eval-mode accuracy this far (a fraction) below the batch-statistics accuracy is a warning."""


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def reestimate_batchnorm_(
    model: nn.Module, loader: Iterable, device: torch.device, batches: int, dist: DistContext | None = None
) -> int:
    """Recompute every BatchNorm's running statistics as the plain average over the first
    ``batches`` training batches through the model as it is now (torch's ``update_bn``, as after
    stochastic weight averaging). Returns the number of batches used (0: no BatchNorm)."""
    from torch.optim.swa_utils import update_bn

    norms = batchnorms(model)
    if not norms or batches <= 0:
        return 0
    first = [split_batch(batch, labels=False)[0] for batch in islice(loader, batches)]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # dropout draws
        update_bn(first, model, device=device)
    if dist is not None:
        dist.average_buffers(model)  # every process's average over its own batches
    log.info(
        "re-estimated the running statistics of %d BatchNorm layers over %d training batches", len(norms), len(first)
    )
    return len(first)


@torch.no_grad()
def batchnorm_mismatch(
    model: nn.Module, loader: Iterable, device: torch.device, batches: int = 4
) -> tuple[float, float] | None:
    """(accuracy in eval mode, accuracy with batch statistics) on the first ``batches`` batches;
    None for a model without BatchNorm. The model is left as it was (a copy runs with batch
    statistics)."""
    if not batchnorms(model):
        return None
    probe = copy.deepcopy(model).eval()
    for bn in batchnorms(probe):
        bn.train()  # batch statistics; only the copy's running statistics move
    was_training = model.training
    model.eval()
    correct_eval = correct_batch = count = 0
    try:
        for batch in islice(loader, batches):
            x, y = split_batch(batch)
            x, y = x.to(device), y.to(device)
            correct_eval += int((model(x).argmax(1) == y).sum())
            correct_batch += int((probe(x).argmax(1) == y).sum())
            count += y.numel()
    finally:
        model.train(was_training)
    return (correct_eval / max(1, count), correct_batch / max(1, count))


def warn_on_mismatch(model: nn.Module, loader: Iterable, device: torch.device, when: str) -> tuple[float, float] | None:
    """Log a warning when eval-mode accuracy is far below the batch-statistics accuracy."""
    measured = batchnorm_mismatch(model, loader, device)
    if measured is not None and measured[0] < measured[1] - MISMATCH_POINTS:
        log.warning(
            "%s: accuracy in eval mode %.1f %% but %.1f %% with batch statistics: the BatchNorm running "
            "statistics do not fit this data (never estimated on it, or under other preprocessing); "
            "train.bn_batches re-estimates them after training",
            when,
            100 * measured[0],
            100 * measured[1],
        )
    return measured
