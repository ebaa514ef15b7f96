"""Data-parallel RobustDLRT under ``torchrun`` (torch.distributed).

Gradients are averaged with one all-reduce per step over a flat buffer (ranks change the
parameter shapes every few steps, which DistributedDataParallel's fixed buckets do not
allow; a flat all-reduce has the same effect and no bucket bookkeeping). Basis changes
(augment/truncate) are computed on every process from identical inputs and then made
identical by construction: rank 0 broadcasts the new ranks, factors, cores and the cores'
optimizer state, so no process can drift by a rounding difference in QR/SVD.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..layers import low_rank_layers

log = logging.getLogger(__name__)


class DistContext:
    """Everything the trainer needs to know about the process group (a no-op when single)."""

    def __init__(self) -> None:
        self.enabled = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.enabled else 0
        self.world_size = dist.get_world_size() if self.enabled else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- collectives ------------------------------------------------------------
    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        if self.enabled:
            tensor = tensor.clone()
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_grads(self, params: list[nn.Parameter]) -> None:
        """Average gradients across processes (missing grads count as zeros everywhere)."""
        if not self.enabled or not params:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world_size
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n

    def sync_low_rank(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Make every process hold rank 0's factors, cores, ranks and core optimizer state."""
        if not self.enabled:
            return
        for layer in low_rank_layers(model).values():
            ranks = layer.rank_state.clone()
            dist.broadcast(ranks, src=0)
            if tuple(ranks.tolist()) != layer.ranks:
                layer.set_ranks_(tuple(int(r) for r in ranks.tolist()))
                # state shapes follow the core; rank 0's state arrives below
                state = optimizer.state.get(layer.core, {})
                for key, value in list(state.items()):
                    if torch.is_tensor(value) and value.dim() > 0:
                        state[key] = torch.zeros_like(layer.core)
            for p in [*layer.bases(), layer.core]:
                dist.broadcast(p.data, src=0)
            state = optimizer.state.get(layer.core, {})
            for key in sorted(state):
                value = state[key]
                if torch.is_tensor(value) and value.shape == layer.core.shape:
                    dist.broadcast(value, src=0)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_from_env(backend: str | None = None) -> DistContext:
    """Join the process group that torchrun describes in the environment (if any).

    gloo on CPUs, nccl when CUDA is available; each process uses cuda:LOCAL_RANK.
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
        log.info("joined process group: rank %s of %s (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return DistContext()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
