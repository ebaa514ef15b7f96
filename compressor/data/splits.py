"""Seeded splits: stratified validation split, subsets, and the training split's channel statistics."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

STATS_SAMPLE = 1024
"""Images sampled (by seed) to estimate mean/std of file-backed sets (imagefolder)."""


def _stratified_split(targets: torch.Tensor, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Per class, a seeded ``val_fraction`` share goes to validation. Returns sorted index lists."""
    g = torch.Generator()
    g.manual_seed(seed)
    n = targets.numel()
    perm = torch.randperm(n, generator=g)
    val: list[int] = []
    for c in torch.unique(targets).tolist():
        members = perm[targets[perm] == c]  # this class, in seeded random order
        val.extend(members[: int(round(val_fraction * members.numel()))].tolist())
    if not val and n >= 2:
        val = [int(perm[0])]
    val_set = set(val)
    train = [i for i in range(n) if i not in val_set]
    return train, sorted(val)


def _subset(indices: list[int], k: int | None, seed: int) -> list[int]:
    if k is None or k >= len(indices):
        return indices
    g = torch.Generator()
    g.manual_seed(seed)
    keep = torch.randperm(len(indices), generator=g)[:k]
    return sorted(indices[i] for i in keep.tolist())


def _estimate_stats(ds: Dataset, n: int, seed: int) -> tuple[list[float], list[float]]:
    """Per-channel mean/std from up to :data:`STATS_SAMPLE` items (file-backed sets)."""
    g = torch.Generator()
    g.manual_seed(seed)
    pick = torch.randperm(n, generator=g)[:STATS_SAMPLE].tolist()
    s = torch.zeros(3, dtype=torch.float64)
    s2 = torch.zeros(3, dtype=torch.float64)
    count = 0
    for i in pick:
        x = ds[i][0].to(torch.float64)
        s += x.sum(dim=(1, 2))
        s2 += (x * x).sum(dim=(1, 2))
        count += x.shape[1] * x.shape[2]
    mean = s / count
    std = (s2 / count - mean * mean).clamp_min(0).sqrt()
    return mean.tolist(), std.tolist()
