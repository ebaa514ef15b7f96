"""The entry point: a named data set → seeded, split, possibly sharded train/validation loaders."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from ..errors import ConfigError, DataError, unknown_name
from ..recipe import DataSection
from .bundle import DataBundle, preprocess_spec
from .datasets import SplitDataset
from .samplers import GlobalBatchShardSampler, SeededShuffleSampler, ShardBatchSampler
from .sources import _DATASETS, list_datasets
from .splits import _estimate_stats, _stratified_split, _subset
from .transforms import CropFlip

log = logging.getLogger(__name__)


def build_data(section: DataSection, *, input_size: int, seed: int, rank: int = 0, world_size: int = 1) -> DataBundle:
    """Load ``section.name``, split it by ``seed`` and build the loaders for this rank.

    With ``world_size > 1``, ``section.batch_size`` is the global batch: the training loader
    yields this rank's ``batch_size / world_size`` images of each global batch
    (:class:`GlobalBatchShardSampler`) and the validation loader whole global batches
    ``rank, rank + world_size, ...`` (:class:`ShardBatchSampler`; every image on exactly one
    rank). The statistics and split sizes are global and equal on every rank. The caller must
    call :func:`set_epoch` on the training loader at the start of each epoch.
    """
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
        raise ConfigError(f"input_size must be a positive int, got {input_size!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} / world_size {world_size}: need world_size >= 1 and 0 <= rank < world_size")
    key = section.name.strip().lower().replace("_", "-")
    key = {"fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist", "image-folder": "imagefolder"}.get(key, key)
    if key not in _DATASETS:
        raise unknown_name("data set", section.name, list_datasets())
    src = _DATASETS[key](section, input_size)

    n_all = len(src.dataset)
    if n_all == 0:
        raise DataError(f"data set {section.name!r} is empty: check data.root")
    # separate streams so that changing a subset size never changes the split
    if src.val_dataset is None:
        train_idx, val_idx = _stratified_split(src.targets, section.val_fraction, seed)
        val_base, val_targets = src.dataset, src.targets
    else:
        train_idx, val_idx = list(range(n_all)), list(range(len(src.val_dataset)))
        val_base, val_targets = src.val_dataset, src.val_targets
    train_idx = _subset(train_idx, section.train_subset, seed + 1)
    val_idx = _subset(val_idx, section.val_subset, seed + 2)
    if not train_idx or not val_idx:
        raise DataError(
            f"data set {section.name!r} has {n_all} images: too few for a training and a validation split; "
            "add images or change data.val_fraction"
        )

    augment = None
    if section.augment:
        augment = CropFlip(padding=max(1, round(4 * input_size / 32)), flip=src.flip, seed=seed)
    train_ds = SplitDataset(src.dataset, train_idx, src.targets, augment)
    val_ds = SplitDataset(val_base, val_idx, val_targets)

    if hasattr(src.dataset, "channel_stats"):
        mean, std = src.dataset.channel_stats(train_idx)
    else:
        mean, std = _estimate_stats(SplitDataset(src.dataset, train_idx, src.targets), len(train_idx), seed + 3)
    std = [max(s, 1e-3) for s in std]  # a constant channel must not divide by zero downstream

    train_sampler: Sampler[int]
    pin = torch.cuda.is_available()
    g = torch.Generator()
    g.manual_seed(seed)
    if world_size > 1:
        train_sampler = GlobalBatchShardSampler(len(train_ds), seed, rank, world_size, section.batch_size)
        local_batch, drop_last = section.batch_size // world_size, False  # the sampler yields whole batches only
        val_kwargs: dict[str, Any] = {
            "batch_sampler": ShardBatchSampler(len(val_ds), section.eval_batch_size, rank, world_size)
        }
    else:
        train_sampler = SeededShuffleSampler(len(train_ds), seed)
        local_batch, drop_last = section.batch_size, len(train_sampler) >= section.batch_size
        val_kwargs = {"batch_size": section.eval_batch_size, "shuffle": False}
    train_loader = DataLoader(
        train_ds,
        batch_size=local_batch,
        sampler=train_sampler,
        num_workers=section.num_workers,
        drop_last=drop_last,
        generator=g,
        pin_memory=pin,
    )
    val_loader = DataLoader(val_ds, num_workers=section.num_workers, pin_memory=pin, **val_kwargs)
    num_classes = len(src.class_names)
    log.info(
        "data %s: %d train / %d val images, %d classes, %dx%d, mean %s std %s%s",
        key,
        len(train_ds),
        len(val_ds),
        num_classes,
        input_size,
        input_size,
        [round(m, 4) for m in mean],
        [round(s, 4) for s in std],
        f", rank {rank}/{world_size}, {section.batch_size // world_size} of each global batch of {section.batch_size}"
        if world_size > 1
        else "",
    )
    return DataBundle(
        train_loader=train_loader,
        val_loader=val_loader,
        num_classes=num_classes,
        in_chans=3,
        mean=[float(m) for m in mean],
        std=[float(s) for s in std],
        class_names=src.class_names,
        n_train=len(train_ds),
        n_val=len(val_ds),
        name=key,
        train_dataset=train_ds,
        val_dataset=val_ds,
        input_size=input_size,
        preprocess=preprocess_spec(key, input_size),
    )
