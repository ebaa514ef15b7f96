"""RobustDLRT: rank-adaptive dynamical low-rank training with the spectral regularizer.

The training cycle of the paper's Appendix A, one cycle per ``coefficient_steps`` (s*) batches:

    batch 1      forward/backward with the bases trainable → coefficient step on the cores and
                 dense parameters (the augmentation batch is not wasted) → AUGMENT every layer:
                 Û = orth([U | ∂L/∂U]), V̂ = orth([V | ∂L/∂V]), core zero-padded (W unchanged)
    batches 2…s* coefficient steps on L + β Σ R(core) with the bases frozen (eq. 9)
    batch s*     … and after its step, TRUNCATE every layer by the relative tolerance τ

Optimizer state follows every basis change; an epoch never ends augmented (the last batch
truncates). After the rank-adaptive epochs, optional fixed-rank epochs train the cores only.
With no factorized layers and β = 0 the same loop is plain training: the dense baseline uses it.

The objective is the cross-entropy and the loss terms the recipe lists (``train.beta`` with
``train.regularizer``, ``train.adversarial``, ``train.distill``: :meth:`TrainSection.loss_terms`),
built from the registry in :mod:`compressor.train.losses`; the trainer only sums what they give.

Configuration: the recipe's sections themselves (:data:`TrainingSection`), with their defaults.

Under torchrun (``dist``, a :class:`~compressor.runtime.DistContext`) every step
all-reduces the gradients with the step's loss and correct count, every basis change ends with
rank 0's ranks, factors, cores and core optimizer state on all processes, buffers are averaged
at epoch ends, and only rank 0 writes checkpoints (see docs/distributed.md).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import LowRankLayer, low_rank_layers
from ..layers.conv import to_channels_last
from ..recipe import BaselineSection, TrainSection
from ..runtime import DistContext, ProgressFactory, autocast_context, compression_stats, silent_progress
from .checkpoint import CheckpointWriter, load_checkpoint, rng_state, set_rng_state
from .common import (
    build_optimizer,
    build_schedule,
    clean_accuracy,
    guarded_step,
    remap_optimizer_state,
    trainable_parameters,
)
from .losses import LossTerm, TrainingContext, create
from .losses.spectral import layer_regularizer

log = logging.getLogger(__name__)

# Every this many truncations of a run, the truncation also re-factors the tall bases U·P by
# Cholesky QR (see TuckerConv2d.truncate_); in between they drift from orthonormality by only
# float rounding (tests/test_layers.py bounds the drift over 60 truncations without it).
REORTHONORMALIZE_EVERY = 8


TrainingSection = TrainSection | BaselineSection
"""What a Trainer is configured by: the recipe's ``train`` section (rank-adaptive RobustDLRT, then
fixed-rank epochs) or its ``baseline`` section (dense fine-tuning: fixed-rank epochs only, β = 0)."""


@dataclass
class TrainingHistory:
    epochs: list[dict[str, Any]] = field(default_factory=list)
    kappa_trace: list[dict[str, Any]] = field(default_factory=list)  # per truncation: step, {layer: κ}
    nonfinite_steps: int = 0
    loss_terms: list[dict[str, Any]] = field(default_factory=list)
    """The objective's terms with their weights (``Trainer.loss_summary``), set by every fit;
    the report shows them, and the checkpointed history leaves them out (the recipe has them)."""

    def to_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "kappa_trace": self.kappa_trace, "nonfinite_steps": self.nonfinite_steps}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainingHistory:
        return cls(list(d.get("epochs", [])), list(d.get("kappa_trace", [])), int(d.get("nonfinite_steps", 0)))


def _default_set_epoch(loader: Iterable, epoch: int) -> None:
    from ..data import set_epoch

    set_epoch(loader, epoch)


class Trainer:
    """Trains ``model`` in place; ``fit()`` returns the history. See the module docstring.

    ``teacher``: the model ``train.distill`` distills from (moved to ``device``, put in eval
    mode, never trained); needed only when distillation is on, and not kept otherwise.
    """

    def __init__(
        self,
        model: nn.Module,
        train_loader: Iterable,
        config: TrainingSection,
        *,
        val_loader: Iterable | None = None,
        device: torch.device | str = "cpu",
        seed: int = 0,
        dist: DistContext | None = None,
        checkpoint_path: str | Path | None = None,
        progress: ProgressFactory = silent_progress,
        name: str = "dlrt",
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        set_epoch: Callable[[Iterable, int], None] | None = None,
        checkpoint_writer: CheckpointWriter | None = None,
        teacher: nn.Module | None = None,
    ) -> None:
        self.model = model
        self.train_loader, self.val_loader = train_loader, val_loader
        if not isinstance(config, (TrainSection, BaselineSection)):
            raise TypeError(f"config must be a recipe's TrainSection or BaselineSection, got {type(config).__name__}")
        self.cfg = config
        dense = isinstance(config, BaselineSection)
        self.adaptive_epochs = 0 if dense else config.epochs
        self.fixed_epochs = config.epochs if dense else config.finetune_epochs
        self.kappa_max = None if dense else config.kappa_max
        self._live: dict[str, int] = {}  # per layer, its rank before the current augmentation
        self.device = torch.device(device)
        self.seed = seed
        self.dist = dist or DistContext()
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.progress, self.name = progress, name
        self.loss_fn = loss_fn or F.cross_entropy
        self.set_epoch = set_epoch or _default_set_epoch
        self.layers: dict[str, LowRankLayer] = low_rank_layers(model)
        # Factorized convs run NHWC (TuckerConv2d.channels_last). Fed NHWC from the start, the
        # layers before the first of them (a dense first conv, its ReLU) run in that layout too;
        # fed NCHW, the first factorized conv converts its input, and in the backward the
        # ReLUs before it meet an NHWC gradient with NCHW activations, a slow mixed-layout path.
        self.channels_last_input = any(layer.channels_last for layer in self.layers.values())
        self.dist.sync_model(model)  # rank 0's ranks, weights and buffers everywhere (no-op when single)
        if self.adaptive_epochs and not self.layers:
            log.warning("%s: the model has no factorized layers; rank-adaptive epochs train it densely", name)
        specs = config.loss_terms()
        context = TrainingContext(
            model,
            self.layers,
            self.device,
            config.amp,
            seed,
            self.dist,
            teacher if any(n == "distill" for n, _ in specs) else None,  # kept only by the term that uses it
        )
        self.terms: list[LossTerm] = [create(n, context, **options) for n, options in specs]
        cores, dense = trainable_parameters(model)
        self.params = cores + dense
        # U and V are not in the optimizer: QR/SVD set them; a step or weight decay would
        # break their orthonormality.
        self.optimizer = build_optimizer(
            [{"params": cores}, {"params": dense}], config.optimizer, config.lr, config.momentum, config.weight_decay
        )
        self.total_epochs = self.adaptive_epochs + self.fixed_epochs
        self.scheduler = build_schedule(self.optimizer, config.schedule, self.total_epochs * len(train_loader))
        self.budget = None  # train.target's Budget, built at the first truncation
        self._budget_start: float | None = None
        self._initial_ranks = {n: tuple(layer.ranks) for n, layer in self.layers.items()}
        self.history = TrainingHistory()
        self.global_step = 0
        # checkpoints are written in the background; a writer shared with the pipeline keeps
        # its files in order (the dense stage's before the first RobustDLRT one) and waits for them
        self._writer = checkpoint_writer or CheckpointWriter()
        self._owns_writer = checkpoint_writer is None

    # ------------------------------------------------------------------ the loop
    def fit(self, resume: bool = False) -> TrainingHistory:
        try:
            self._fit(resume)
        except BaseException:
            if self._owns_writer:  # a crash leaves the last submitted checkpoint on disk for a resume
                self._writer.wait(raise_error=False)
            raise
        if self._owns_writer:
            self._writer.wait()  # the last checkpoint is on disk when fit returns
        return self.history

    def loss_summary(self) -> list[dict[str, Any]]:
        """The objective's terms and their weights: the cross-entropy's, then every term's."""
        ce = math.prod(term.data_weight for term in self.terms)
        return [{"term": "cross_entropy", "weight": ce}] + [term.describe() for term in self.terms]

    def _fit(self, resume: bool) -> None:
        start_epoch = self._restore() if resume else 0
        self.history.loss_terms = self.loss_summary()
        s_star = self.cfg.coefficient_steps if self.adaptive_epochs else 1
        for epoch in range(start_epoch, self.total_epochs):
            adaptive = epoch < self.adaptive_epochs and bool(self.layers)
            self.set_epoch(self.train_loader, epoch)
            self.model.train()
            n_batches = len(self.train_loader)
            truncations_per_epoch = -(-n_batches // s_star)  # the last batch truncates a partial cycle
            bar = self.progress(n_batches, f"{self.name} {epoch + 1}/{self.total_epochs}")
            tally = {"loss": 0.0, "reg": 0.0, "correct": 0, "count": 0, "t_aug": 0.0, "t_trunc": 0.0}
            start = time.perf_counter()
            for i, (x, y) in enumerate(self.train_loader):
                augment_now = adaptive and i % s_star == 0
                truncate_now = adaptive and (i % s_star == s_star - 1 or i == n_batches - 1)

                if augment_now:
                    self._set_bases_trainable(True)
                buffers = self._snapshot_buffers()
                loss, reg, correct = self._forward_backward(x, y)
                # one all-reduce: gradients averaged, [loss, correct] summed over processes, so
                # the step/skip decision and the tallies are those of the global batch
                stats = torch.stack([loss, torch.full_like(loss, float(correct))])
                stats = self.dist.all_reduce_grads(self.params + (self._bases() if augment_now else []), stats)
                loss, correct = stats[0] / self.dist.world_size, int(round(float(stats[1])))
                count = y.numel() * self.dist.world_size
                took = guarded_step(self.params, self.optimizer, self.cfg.grad_clip, loss)
                if took and self.kappa_max is not None:
                    self._clamp_conditioning()
                if not took:
                    self._restore_buffers(buffers)  # a NaN forward would have poisoned BatchNorm's running stats
                    self.history.nonfinite_steps += 1
                    log.warning("%s: non-finite loss or gradient at step %d: step skipped", self.name, self.global_step)
                if augment_now:
                    t = time.perf_counter()
                    if took and self._bases_grads_finite():  # NaN directions would poison the bases
                        self._augment()
                    elif took:
                        log.warning(
                            "%s: non-finite basis gradient at step %d: augmentation skipped",
                            self.name,
                            self.global_step,
                        )
                    self._set_bases_trainable(False)
                    tally["t_aug"] += time.perf_counter() - t
                if truncate_now:
                    t = time.perf_counter()
                    # counted from (epoch, batch): a resumed run re-factors where an uninterrupted one does
                    index = epoch * truncations_per_epoch + i // s_star
                    self._truncate(
                        exact=index % REORTHONORMALIZE_EVERY == REORTHONORMALIZE_EVERY - 1,
                        index=index,
                        ramp=max(1, round(self._target_ramp() * self.adaptive_epochs * truncations_per_epoch)),
                        input_shape=tuple(x.shape[1:]),
                        last=epoch == self.adaptive_epochs - 1 and i == n_batches - 1,
                    )
                    tally["t_trunc"] += time.perf_counter() - t
                    self._trace_kappa()
                self._schedule_step(took)
                self.global_step += 1

                if took:
                    tally["loss"] += float(loss) * count
                    tally["reg"] += float(reg) * count
                    tally["correct"] += correct
                    tally["count"] += count
                bar.update(1)
                if truncate_now or i == n_batches - 1:
                    bar.set_postfix(self._postfix(tally))
            bar.close()
            self._end_epoch(epoch, adaptive, tally, time.perf_counter() - start)

    # ------------------------------------------------------------------ pieces
    def _forward_backward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, int]:
        """One forward and backward: (data loss, penalty, correct count). The objective is
        L + Σ wᵢ·Pᵢ, L the cross-entropy as the terms change it (:mod:`compressor.train.losses`)."""
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        clean = x
        for term in self.terms:  # e.g. adversarial examples against the model as it is now
            x = term.inputs(x, y, self.global_step)
        if self.channels_last_input:
            x = to_channels_last(x)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast_context(self.device, self.cfg.amp):
            logits = self.model(x)
        # the loss in float32 at least (bf16 autocast logits), in float64 for a float64 model
        loss = self.loss_fn(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, y)
        for term in self.terms:  # e.g. distillation towards the teacher's soft labels
            loss = term.data_loss(loss, logits, clean, y)
        objective, penalties = loss, []
        for term in self.terms:  # e.g. β·R(S): on the cores only (never U, V), in float32 under autocast
            if (penalty := term.penalty()) is not None:
                objective = objective + term.weight * penalty
                penalties.append(penalty.detach())
        objective.backward()
        reg = torch.stack(penalties).sum() if penalties else torch.zeros((), device=self.device)
        correct = int((logits.detach().argmax(1) == y).sum())
        return loss.detach(), reg, correct

    def _clamp_conditioning(self) -> None:
        """Every core's κ ≤ train.kappa_max after every optimizer step and every truncation.
        Between an augmentation and its truncation the bound holds on the directions each layer
        had before augmenting (``_live``); raising the candidates' zero singular values would
        add arbitrary directions at σ_max/κ_max to the function every cycle. The optimizer's
        moments stay as they are: the clamp moves the core, not the statistics of its gradients."""
        for name, layer in self.layers.items():
            layer.clamp_condition_(self.kappa_max, live=self._live.get(name))

    def _schedule_step(self, took: bool) -> None:
        """The schedule advances with the step count, taken or skipped (so that a resumed or a
        NaN-hit run keeps the same learning rate per step). torch warns when the very first
        optimizer step was skipped; here that is intended, and logged already."""
        if took:
            self.scheduler.step()
            return
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            self.scheduler.step()

    def _snapshot_buffers(self) -> list[tuple[Tensor, Tensor]]:
        """Copies of the floating buffers (BatchNorm running stats): a skipped step restores them."""
        return [(b, b.detach().clone()) for b in self.model.buffers() if b.is_floating_point()]

    @staticmethod
    def _restore_buffers(snapshot: list[tuple[Tensor, Tensor]]) -> None:
        with torch.no_grad():
            for buffer, saved in snapshot:
                buffer.copy_(saved)

    def _bases_grads_finite(self) -> bool:
        # one fused norm instead of an isfinite pass per tensor; a norm that overflows to inf
        # (entries > ~1e19) also means an unusable direction
        grads = [p.grad for p in self._bases() if p.grad is not None]
        return not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))

    def _bases(self) -> list[nn.Parameter]:
        return [p for layer in self.layers.values() for p in layer.bases()]

    def _set_bases_trainable(self, flag: bool) -> None:
        for layer in self.layers.values():
            layer.set_bases_trainable(flag)

    def _augment(self) -> None:
        self._live = {name: layer.ranks[0] for name, layer in self.layers.items()}  # core_matrix's rows
        for k, layer in enumerate(self.layers.values()):
            old_shape = layer.core.shape
            change = layer.augment_(seed=self.seed * 7919 + self.global_step * 131 + k)
            remap_optimizer_state(self.optimizer, layer.core, change, old_shape)
        self.dist.sync_low_rank(self.model, self.optimizer)

    def _target_ramp(self) -> float:
        target = getattr(self.cfg, "target", None)
        return target.ramp if target is not None and target.kind is not None else 1.0

    def _truncate(
        self,
        exact: bool = True,
        index: int = 0,
        ramp: int = 1,
        input_shape: tuple[int, ...] = (),
        last: bool = False,
    ) -> None:
        self._live = {}
        caps = self._budget_caps(index, ramp, input_shape, last)
        for name, layer in self.layers.items():
            old_shape = layer.core.shape
            # with a budget its ranks are the truncation (τ = 0 keeps every nonzero direction up to
            # them; a latency budget's last ranks already stay within τ's)
            tau = 0.0 if caps else self.cfg.tau
            change = layer.truncate_(tau, reorthonormalize_bases=exact, rank_cap=caps.get(name))
            remap_optimizer_state(self.optimizer, layer.core, change, old_shape)
        self.dist.sync_low_rank(self.model, self.optimizer)
        if self.kappa_max is not None:  # a conv's truncated input mode can spread its C₍₀₎ spectrum again
            self._clamp_conditioning()

    def _budget_caps(
        self, index: int, ramp: int, input_shape: tuple[int, ...], last: bool = False
    ) -> dict[str, tuple[int, ...]]:
        """Every layer's rank cap from the budget (``train.target``), none without one. The
        budget is built at the first truncation (it needs the input size) from the cost the
        model had when training started, which a checkpoint keeps for a resumed run."""
        target = getattr(self.cfg, "target", None)
        if target is None or target.kind is None:
            return {}
        if self.budget is None:
            from .budget import Budget

            self.budget = Budget(
                self.model,
                target.kind,
                target.fraction,
                input_size=input_shape[-1],
                in_chans=input_shape[0],
                ramp_truncations=ramp,
                start=self._budget_start,
                start_ranks=self._initial_ranks,
                multiple=target.multiple,
                latency=target.latency_settings(in_chans=input_shape[0], input_size=input_shape[-1]),
                tau=self.cfg.tau,
            )
            self._budget_start = self.budget.start
        self.budget.ramp = ramp
        self.budget.truncations = index
        return self.budget.caps(last=last)

    def _trace_kappa(self) -> None:
        self.history.kappa_trace.append(
            {
                "step": self.global_step,
                # float32 κ: the trace runs at every truncation (the report's final κ is float64)
                "kappa": {n: l.condition_number(precise=False) for n, l in self.layers.items()},
            }
        )

    def _postfix(self, tally: dict[str, float]) -> dict[str, Any]:
        post = {
            "loss": f"{tally['loss'] / max(1, tally['count']):.3f}",
            "acc": f"{tally['correct'] / max(1, tally['count']):.3f}",
        }
        if self.layers:
            post["c.r."] = f"{compression_stats(self.model).rate:.1f}%"
        return post

    def _end_epoch(self, epoch: int, adaptive: bool, tally: dict[str, float], seconds: float) -> None:
        self.dist.average_buffers(self.model)  # BatchNorm running statistics: one model for eval/checkpoint
        stats = compression_stats(self.model)
        count = max(1, tally["count"])
        last = epoch + 1 == self.total_epochs
        validate = (
            self.val_loader is not None and self.cfg.val_every > 0 and ((epoch + 1) % self.cfg.val_every == 0 or last)
        )
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "phase": "rank-adaptive" if adaptive else ("fixed-rank" if self.layers else "dense"),
            "train_loss": tally["loss"] / count,
            "train_accuracy": tally["correct"] / count,
            "regularizer": tally["reg"] / count,
            "val_accuracy": (
                clean_accuracy(self.model, self.val_loader, self.device, self.cfg.amp, self.dist) if validate else None
            ),
            "params": stats.params,
            "compression_rate": stats.rate,
            "lr": self.optimizer.param_groups[0]["lr"],
            "seconds": seconds,
            "seconds_augment": tally["t_aug"],
            "seconds_truncate": tally["t_trunc"],
            "nonfinite_steps_total": self.history.nonfinite_steps,
            "layers": {
                n: {
                    "ranks": list(l.ranks),
                    "condition_number": _finite_or_none(l.condition_number()),
                    "regularizer": _no_grad_float(layer_regularizer, l),
                }
                for n, l in self.layers.items()
            },
        }
        if self.budget is not None:
            record["budget"] = self.budget.summary()
        self.history.epochs.append(record)
        val = record["val_accuracy"]
        log.info(
            "%s epoch %d: loss %.4f, train acc %.4f, val acc %s, c.r. %.2f%%, %.1fs",
            self.name,
            epoch + 1,
            record["train_loss"],
            record["train_accuracy"],
            "not scored" if val is None else f"{val:.4f}",
            stats.rate,
            seconds,
        )
        every = self.cfg.checkpoint_every
        if self.checkpoint_path is not None and every and ((epoch + 1) % every == 0 or last):
            self._save(epoch + 1)

    # ------------------------------------------------------------------ checkpoints
    def _save(self, next_epoch: int) -> None:
        if self.dist.is_main:  # written in the background while the next epoch trains
            self._writer.submit(
                self.checkpoint_path,
                {
                    "name": self.name,
                    "epoch": next_epoch,
                    "global_step": self.global_step,
                    "model": self.model.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "rng": rng_state(),
                    "history": self.history.to_dict(),
                    "budget_start": self._budget_start,
                },
            )
        self.dist.barrier()

    def _restore(self) -> int:
        """Load the checkpoint (if any) and return the epoch to continue from."""
        # rank 0 wrote the checkpoint, so rank 0 alone decides and reads; the others receive it
        if self.checkpoint_path is None or not self.dist.main_decides(self.checkpoint_path.is_file()):
            return 0
        payload = self.dist.from_main(lambda: load_checkpoint(self.checkpoint_path, map_location="cpu"))
        self.model.load_state_dict(payload["model"])  # resizes factors to the saved ranks
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        set_rng_state(payload["rng"])
        self.history = TrainingHistory.from_dict(payload["history"])
        self._budget_start = payload.get("budget_start")
        self.global_step = int(payload["global_step"])
        log.info("%s: resumed from %s at epoch %d", self.name, self.checkpoint_path, payload["epoch"] + 1)
        return int(payload["epoch"])


def _no_grad_float(fn: Callable[..., Tensor], *args: Any) -> float:
    with torch.no_grad():
        return float(fn(*args))


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
