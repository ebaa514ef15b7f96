"""Data-parallel RobustDLRT under ``torchrun`` (torch.distributed). See docs/distributed.md.

Gradients are averaged with one all-reduce per step over a flat buffer (ranks change the
parameter shapes every few steps, which DistributedDataParallel's fixed buckets do not
allow; a flat all-reduce has the same effect and no bucket bookkeeping). The step's loss and
correct count travel in the same buffer, so every process takes the same skip-or-step
decision on a non-finite loss and the logged training figures are those of the global batch.

Basis changes (augment/truncate) are computed on every process from identical inputs and
then made identical by construction: rank 0 broadcasts the new ranks (one small broadcast)
and then every factor, core and core-shaped optimizer moment (one flat broadcast), so no
process can drift by a rounding difference in QR/SVD, and a process whose truncation chose
another rank is resized to rank 0's first. Floating-point buffers (BatchNorm running
statistics) are averaged at epoch ends; checkpoints and stage files are read by rank 0 only
and sent to the others, so resuming needs no shared file system.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import ConfigError
from .factorized import factorized_modules

log = logging.getLogger(__name__)

T = TypeVar("T")


class DistContext:
    """Everything the trainer needs to know about the process group (a no-op when single)."""

    def __init__(self) -> None:
        self.enabled = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.enabled else 0
        self.world_size = dist.get_world_size() if self.enabled else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _ctl_device(self) -> torch.device:
        """Where small control tensors live: a CUDA device only for a pure-NCCL group."""
        if self.enabled and dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    # -- collectives ------------------------------------------------------------
    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum over processes (a copy; the input is left alone)."""
        if self.enabled:
            tensor = tensor.clone()
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_grads(self, params: list[nn.Parameter], stats: Tensor | None = None) -> Tensor | None:
        """Average gradients across processes (missing grads count as zeros everywhere).

        ``stats`` (a small 1-D tensor, e.g. [loss, correct]) rides in the same all-reduce and
        comes back summed over processes; returned as given when single. One collective.
        """
        if not self.enabled:
            return stats
        if not params and stats is None:
            return None
        ref = params[0] if params else stats
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        parts = [g.reshape(-1) for g in grads]
        if stats is not None:
            parts.append(stats.detach().reshape(-1).to(device=ref.device, dtype=ref.dtype if params else stats.dtype))
        flat = torch.cat(parts)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = (flat[offset : offset + n] / self.world_size).view_as(p).to(p.dtype).clone()
            offset += n
        if stats is None:
            return None
        return flat[offset:].to(stats.dtype).view_as(stats).clone()

    def sync_low_rank(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Make every process hold rank 0's ranks, factors, cores and core optimizer state.

        Two collectives: the ranks of all layers (then a process with other ranks resizes
        its factors and its core-shaped moments), and one flat buffer with every factor,
        core and core-shaped moment (exp_avg, exp_avg_sq, momentum_buffer...).
        """
        if not self.enabled:
            return
        layers = list(factorized_modules(model).values())
        if not layers:
            return
        ranks = torch.cat([layer.rank_state.reshape(-1) for layer in layers]).to(self._ctl_device())
        dist.broadcast(ranks, src=0)
        ranks = ranks.cpu().tolist()
        tensors: list[Tensor] = []
        offset = 0
        for layer in layers:
            n = len(layer.ranks)
            want = tuple(int(r) for r in ranks[offset : offset + n])
            offset += n
            state = optimizer.state.get(layer.core, {}) if optimizer is not None else {}
            if want != layer.ranks:
                log.debug(
                    "rank %d: %s has ranks %s, rank 0 has %s: resizing",
                    self.rank,
                    type(layer).__name__,
                    layer.ranks,
                    want,
                )
                old_shape = tuple(layer.core.shape)
                layer.set_ranks_(want)
                for key, value in list(state.items()):  # contents arrive from rank 0 below
                    if torch.is_tensor(value) and tuple(value.shape) == old_shape:
                        state[key] = torch.zeros_like(layer.core)
            tensors += [*layer.bases(), layer.core]
            tensors += [
                state[k]
                for k in sorted(state)
                if torch.is_tensor(state[k]) and state[k].dim() > 0 and state[k].shape == layer.core.shape
            ]
        self._broadcast_flat([t.data if isinstance(t, nn.Parameter) else t for t in tensors])

    def sync_model(self, model: nn.Module) -> None:
        """Rank 0's ranks, parameters and buffers everywhere (as DDP does at construction)."""
        if not self.enabled:
            return
        self.sync_low_rank(model)
        self._broadcast_flat(
            [t.data for t in model.state_dict(keep_vars=True).values() if torch.is_tensor(t) and t.numel()]
        )

    def average_buffers(self, model: nn.Module) -> None:
        """Average floating-point buffers (BatchNorm running mean/var) over processes.

        Running statistics are updated linearly from each process's local batches; their
        mean over processes is what one process would have accumulated from the local
        batch statistics. Called at epoch ends, so evaluation, checkpoints and exports see
        one model.
        """
        if not self.enabled:
            return
        groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        for b in model.buffers():
            if b.is_floating_point() and b.numel():
                groups.setdefault((b.dtype, b.device), []).append(b)
        for bufs in groups.values():  # one all-reduce per dtype/device (usually one)
            flat = torch.cat([b.detach().reshape(-1) for b in bufs])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= self.world_size
            offset = 0
            with torch.no_grad():
                for b in bufs:
                    b.copy_(flat[offset : offset + b.numel()].view_as(b))
                    offset += b.numel()

    def _broadcast_flat(self, tensors: list[Tensor]) -> None:
        """Broadcast tensors from rank 0 in one collective per dtype/device group."""
        groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        for t in tensors:
            groups.setdefault((t.dtype, t.device), []).append(t)
        for group in groups.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            dist.broadcast(flat, src=0)
            offset = 0
            with torch.no_grad():
                for t in group:
                    t.copy_(flat[offset : offset + t.numel()].view_as(t))
                    offset += t.numel()

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any process (so that all of them take the same branch)."""
        if not self.enabled:
            return bool(flag)
        return bool(self.all_reduce_sum(torch.tensor([int(flag)], device=self._ctl_device())).item() > 0)

    def main_decides(self, flag: bool) -> bool:
        """Rank 0's value of ``flag`` on every process (e.g. "does the checkpoint exist")."""
        if not self.enabled:
            return bool(flag)
        t = torch.tensor([1 if flag else 0], dtype=torch.long, device=self._ctl_device())
        dist.broadcast(t, src=0)
        return bool(t.item())

    def from_main(self, load: Callable[[], T]) -> T:
        """``load()`` on rank 0, its result sent to every process (pickled; CPU tensors).

        For checkpoints and stage files: only rank 0 writes them, so only rank 0 can be
        relied on to see them (several nodes need no shared file system). An exception on
        rank 0 is raised there; the other processes are then stopped by torchrun.
        """
        if not self.enabled:
            return load()
        box: list[Any] = [load() if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_from_env(backend: str | None = None, device: str = "auto") -> DistContext:
    """Join the process group that torchrun describes in the environment (if any).

    ``backend`` None: ``gloo`` without CUDA (or when ``device`` is ``cpu``), else
    ``cpu:gloo,cuda:nccl`` (NCCL for CUDA tensors, gloo for the few CPU ones); each process
    then uses ``cuda:LOCAL_RANK``. Without torchrun's variables this is a single process.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and not str(device).startswith("cpu")
        if backend is None:
            backend = "cpu:gloo,cuda:nccl" if use_cuda else "gloo"
        if use_cuda:
            local = int(os.environ.get("LOCAL_RANK", 0))
            if local >= torch.cuda.device_count():
                raise ConfigError(
                    f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA device(s) visible: "
                    f"use --nproc_per_node <= {torch.cuda.device_count()}"
                )
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
        log.info("joined process group: rank %s of %s (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return DistContext()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
