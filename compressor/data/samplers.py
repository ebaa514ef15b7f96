"""Seeded epoch order and sharding over processes: samplers, ``set_epoch``, the whole-split loader."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from ..errors import ConfigError, DataError


class SeededShuffleSampler(Sampler[int]):
    """Epoch ``e`` yields ``randperm(n, generator seeded with seed + e)``.

    The same formula as ``DistributedSampler(shuffle=True, seed=seed)`` with one replica, so
    the order is a pure function of (seed, epoch). Call ``set_epoch`` before each epoch.
    """

    def __init__(self, n: int, seed: int):
        self.n = n
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self) -> torch.Tensor:
        """This epoch's permutation of ``range(n)``."""
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order().tolist())

    def __len__(self) -> int:
        return self.n


class GlobalBatchShardSampler(SeededShuffleSampler):
    """Process ``rank``'s part of the one-process training order, global batch by global batch.

    Epoch ``e``'s order is ``randperm(n, seed + e)`` (as :class:`SeededShuffleSampler`); it is
    cut into ``n // global_batch`` full global batches (the incomplete rest is dropped, as the
    one-process loader's ``drop_last`` does), and process k takes positions
    ``k*b .. (k+1)*b - 1`` of each, ``b = global_batch / world_size``. Batched by ``b``, the
    j-th batches of the ``world_size`` processes are together the one-process j-th batch.
    """

    def __init__(self, n: int, seed: int, rank: int, world_size: int, global_batch: int):
        if global_batch % world_size:
            raise ConfigError(
                f"data.batch_size {global_batch} is the global batch and must be divisible by the "
                f"number of processes ({world_size}); use a multiple of {world_size}"
            )
        if n < global_batch:
            raise DataError(
                f"the training split has {n} images, fewer than one global batch "
                f"(data.batch_size {global_batch}): lower data.batch_size or use more images"
            )
        super().__init__(n, seed)
        self.rank, self.world_size = rank, world_size
        self.global_batch, self.local_batch = global_batch, global_batch // world_size

    def __iter__(self) -> Iterator[int]:
        perm = self.order()
        full = (self.n // self.global_batch) * self.global_batch
        mine = perm[:full].view(-1, self.world_size, self.local_batch)[:, self.rank]
        return iter(mine.reshape(-1).tolist())

    def __len__(self) -> int:
        return (self.n // self.global_batch) * self.local_batch


class ShardBatchSampler(Sampler[list[int]]):
    """Batches of an unshuffled split, whole batches per process: global batches
    ``rank, rank + world_size, ...`` of size ``batch_size`` (the last one may be short).

    :func:`~compressor.evaluate.evaluate` reads :attr:`global_batches` to seed attacks by the
    global batch index and to find the first ``max_samples`` of the global order.
    """

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int):
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.global_batches = list(range(rank, -(-n // batch_size), world_size))
        """Global index of each batch this process yields, in order."""
        self.num_samples = sum(min(batch_size, n - b * batch_size) for b in self.global_batches)
        """Images this process yields."""

    def __iter__(self) -> Iterator[list[int]]:
        for b in self.global_batches:
            yield list(range(b * self.batch_size, min(self.n, (b + 1) * self.batch_size)))

    def __len__(self) -> int:
        return len(self.global_batches)


def whole_split_loader(loader: DataLoader) -> DataLoader:
    """The loader one process would have over the same split, from a (possibly sharded) one.

    For work done by rank 0 alone on the whole split (ONNX evaluation, INT8 calibration in the
    export): a training loader keeps the same seed and current epoch (so the same order as one
    process), a validation loader becomes the plain unshuffled one. An unsharded loader is
    returned as it is.
    """
    sampler, batch_sampler = loader.sampler, loader.batch_sampler
    common = dict(num_workers=loader.num_workers, pin_memory=loader.pin_memory)
    if isinstance(sampler, GlobalBatchShardSampler):
        whole = SeededShuffleSampler(sampler.n, sampler.seed)
        whole.set_epoch(sampler.epoch)
        return DataLoader(loader.dataset, batch_size=sampler.global_batch, sampler=whole, drop_last=True, **common)
    if isinstance(batch_sampler, ShardBatchSampler):
        return DataLoader(loader.dataset, batch_size=batch_sampler.batch_size, shuffle=False, **common)
    return loader


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Prepare ``loader`` for epoch ``epoch``: shuffle order, augmentation draws, worker seeds.

    Works for the training samplers (:class:`SeededShuffleSampler`, :class:`GlobalBatchShardSampler`,
    ``DistributedSampler``) and is harmless on validation loaders. The pipeline must call it at
    the start of every epoch.
    """
    sampler = loader.sampler
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)
    seed = getattr(sampler, "seed", None)
    if loader.generator is not None and seed is not None:
        loader.generator.manual_seed(int(seed) + int(epoch))
