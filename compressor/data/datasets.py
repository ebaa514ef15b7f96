"""Dataset classes: images held in one tensor, and a split (a subset of indices, augmented or not)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import DataError
from .transforms import CropFlip

_PRECOMPUTE_BUDGET_BYTES = 512 * 2**20  # resize tensor sets once if the result fits in this


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, h, w) float → (N, C, size, size), bilinear; antialiased only when shrinking."""
    if x.shape[-2:] == (size, size):
        return x
    shrink = size < x.shape[-1] or size < x.shape[-2]
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)


class TensorImages(Dataset):
    """Images held in one tensor (N, C, h, w): uint8 (0–255) or float (already in [0, 1]).

    Resized to ``size`` once when the result fits :data:`_PRECOMPUTE_BUDGET_BYTES` (uint8 stays
    uint8, rounded), otherwise per item. Items are 3×size×size float in [0, 1].
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, size: int):
        if images.ndim != 4 or images.shape[0] != targets.shape[0]:
            raise DataError(f"images {tuple(images.shape)} and labels {tuple(targets.shape)} do not match")
        self.size = size
        self.targets = targets.long()
        self.scale = 1.0 / 255.0 if images.dtype == torch.uint8 else 1.0
        n, c = images.shape[:2]
        if (
            images.shape[-2:] != (size, size)
            and n * c * size * size * images.element_size() <= _PRECOMPUTE_BUDGET_BYTES
        ):
            chunks = []
            for start in range(0, n, 4096):
                x = _resize(images[start : start + 4096].float(), size)
                if images.dtype == torch.uint8:
                    x = x.round_().clamp_(0, 255).to(torch.uint8)
                else:
                    x = x.clamp_(0.0, 1.0)
                chunks.append(x)
            images = torch.cat(chunks)
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i].float() * self.scale
        if x.shape[-2:] != (self.size, self.size):
            x = _resize(x[None], self.size)[0].clamp_(0.0, 1.0)
        if x.shape[0] == 1:
            x = x.repeat(3, 1, 1)
        return x, int(self.targets[i])

    def channel_stats(self, indices: Sequence[int]) -> tuple[list[float], list[float]]:
        """Exact per-channel mean/std over the given items (at the stored resolution)."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        c = self.images.shape[1]
        s = torch.zeros(c, dtype=torch.float64)
        s2 = torch.zeros(c, dtype=torch.float64)
        count = 0
        for start in range(0, len(idx), 4096):
            x = self.images[idx[start : start + 4096]].to(torch.float64) * self.scale
            s += x.sum(dim=(0, 2, 3))
            s2 += (x * x).sum(dim=(0, 2, 3))
            count += x.shape[0] * x.shape[2] * x.shape[3]
        mean = s / count
        std = (s2 / count - mean * mean).clamp_min(0).sqrt()
        if c == 1:
            mean, std = mean.repeat(3), std.repeat(3)
        return mean.tolist(), std.tolist()


class SplitDataset(Dataset):
    """The items ``indices`` of ``base``, optionally augmented (training split)."""

    def __init__(self, base: Dataset, indices: Sequence[int], targets: torch.Tensor, augment: CropFlip | None = None):
        self.base = base
        self.indices = [int(i) for i in indices]
        self.targets = targets[torch.as_tensor(self.indices, dtype=torch.long)] if self.indices else targets[:0]
        self.augment = augment
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of this epoch (called by :func:`set_epoch`)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        j = self.indices[i]
        x, y = self.base[j]
        if self.augment is not None:
            x = self.augment(x, j, self.epoch)
        return x, y
