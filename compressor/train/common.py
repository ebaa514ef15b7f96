"""What the dense baseline and the RobustDLRT trainer share: optimizers, schedules, the
optimizer state's remapping through basis changes, the guarded optimizer step, clean accuracy."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..layers import low_rank_layers
from ..runtime import DistContext, autocast_context

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- parameters


def trainable_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(cores, dense parameters): everything the optimizer updates. Bases are excluded."""
    layers = low_rank_layers(model)
    bases = {id(p) for layer in layers.values() for p in layer.bases()}
    cores = [layer.core for layer in layers.values()]
    core_ids = {id(p) for p in cores}
    dense = [p for p in model.parameters() if id(p) not in bases and id(p) not in core_ids and p.requires_grad]
    return cores, dense


def build_optimizer(
    groups: list[dict], name: str, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ConfigError("the model has no trainable parameters")
    # Fused Adam kernels make one pass over each parameter instead of several (what matters for
    # a classifier with 10⁸ weights); they need all parameters floating point on one CPU/CUDA device.
    params = [p for g in groups for p in g["params"]]
    devices = {p.device.type for p in params}
    fused = len(devices) == 1 and devices <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay, fused=fused or None)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=fused or None)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ConfigError(f"unknown optimizer {name!r}; use adam, adamw or sgd")


def build_schedule(optimizer: torch.optim.Optimizer, kind: str, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule: constant, or cosine from lr to 0 over ``total_steps``."""
    total = max(1, total_steps)
    if kind == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total) / total))
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)


_MAX_ADAM_RATIO = 10.0


def _betas(optimizer: torch.optim.Optimizer, param: nn.Parameter) -> tuple[float, float] | None:
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            betas = group.get("betas")
            return (float(betas[0]), float(betas[1])) if betas is not None else None
    return None


def remap_optimizer_state(optimizer: torch.optim.Optimizer, param: nn.Parameter, change, old_shape) -> None:
    """Carry a core's optimizer state through a basis change.

    First moments / momentum follow the core linearly (new = change(old)). Second moments are
    non-negative and not linear in the basis; we map their square roots, (change(√v))², as the
    reference does, and give directions that had no history (exact zeros after augmentation)
    the mean second moment of the layer instead of 0, so that their first Adam steps are not
    ~1/√(1−β₂) ≈ 30× larger than the others'. Mapped square roots can also nearly cancel where
    the first moment does not, and Adam's step m̂/√v̂ there would be ~1e8 × the learning rate:
    the second moment is floored so that no coordinate's bias-corrected m̂/√v̂ exceeds
    ``_MAX_ADAM_RATIO`` (a genuine Adam state with the default betas never exceeds ~7.3: by
    Cauchy–Schwarz m̂² ≤ (1−β₁)²/((1−β₁²/β₂)(1−β₂)) v̂), so the floor only catches mapping
    artefacts.
    """
    state = optimizer.state.get(param)
    if not state:
        return
    moments = [k for k, v in state.items() if torch.is_tensor(v) and tuple(v.shape) == tuple(old_shape)]
    for key in sorted(moments, key=lambda k: "sq" in k):  # first moments first: they floor the second
        value = state[key]
        if "sq" in key:  # exp_avg_sq, max_exp_avg_sq
            # zero padding (augmentation) keeps every value: no square root round trip
            mapped = change.apply(value) if change.padding else change.apply(value.clamp_min(0).sqrt()).square()
            mapped = torch.where(mapped > 0, mapped, value.mean())
            first, betas = state.get("exp_avg"), _betas(optimizer, param)
            if torch.is_tensor(first) and first.shape == mapped.shape and betas is not None:
                t = float(state.get("step", 1))
                bias = (1 - betas[1] ** t) / (1 - betas[0] ** t) ** 2  # v̂/m̂² = (v/m²) / bias
                mapped = torch.maximum(mapped, first.square() * (bias / _MAX_ADAM_RATIO**2))
            state[key] = mapped.contiguous()
        else:  # exp_avg, momentum_buffer
            state[key] = change.apply(value).contiguous()


# ----------------------------------------------------------------------------- steps


def guarded_step(
    params: list[nn.Parameter], optimizer: torch.optim.Optimizer, grad_clip: float | None, loss: Tensor
) -> bool:
    """Clip, check for NaN/Inf, step. A non-finite loss or gradient skips the step (no update).

    Returns whether the step was taken. One device sync per step (the norm).
    """
    with_grad = [p for p in params if p.grad is not None]
    # Without a clip the gradients are only read (the norm): clip_grad_norm_(inf) would also
    # rescale every one by 1, a needless write over every gradient.
    norm = torch.nn.utils.get_total_norm([p.grad for p in with_grad])
    if not (torch.isfinite(loss) and torch.isfinite(norm)):
        optimizer.zero_grad(set_to_none=True)
        return False
    if grad_clip:  # clip_grad_norm_'s rescaling, by min(1, clip / norm); takes the parameters
        torch.nn.utils.clip_grads_with_norm_(with_grad, grad_clip, norm)
    optimizer.step()
    return True


@torch.no_grad()
def clean_accuracy(
    model: nn.Module, loader: Iterable, device: torch.device, amp: str = "off", dist: DistContext | None = None
) -> float:
    """Top-1 accuracy over a loader (summed across processes under torch.distributed).

    The global RNG is left as it was: a DataLoader without its own generator draws its base
    seed from it, and training must not depend on whether or how often it is validated
    (dropout masks and shuffling would change otherwise).
    """
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    count = torch.zeros((), dtype=torch.long, device=device)
    devices = [device] if torch.device(device).type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            for x, y in loader:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with autocast_context(device, amp):
                    logits = model(x)
                correct += (logits.argmax(1) == y).sum()
                count += y.numel()
    finally:
        model.train(was_training)
    if dist is not None:
        correct, count = dist.all_reduce_sum(correct), dist.all_reduce_sum(count)
    return float(correct) / max(1, int(count))
