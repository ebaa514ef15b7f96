"""Augmentation: a random crop and flip drawn from a hash of (seed, epoch, sample index)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

_U64 = (1 << 64) - 1


def _mix64(*values: int) -> int:
    """splitmix64 over a tuple of ints: a fast, portable hash for per-sample augmentation."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _U64)) & _U64
        h = (h + 0x9E3779B97F4A7C15) & _U64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _U64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _U64
        h ^= h >> 31
    return h


@dataclass(frozen=True)
class CropFlip:
    """Random crop after zero padding, plus an optional horizontal flip.

    The randomness of each call is ``hash(seed, epoch, index)``: reproducible, worker-independent.
    """

    padding: int
    flip: bool
    seed: int

    def __call__(self, x: torch.Tensor, index: int, epoch: int) -> torch.Tensor:
        # x: (C, H, W) → (C, H, W)
        h = _mix64(self.seed, epoch, index)
        p = self.padding
        if p > 0:
            dy, dx = h % (2 * p + 1), (h >> 20) % (2 * p + 1)
            hh, ww = x.shape[-2:]
            x = F.pad(x, (p, p, p, p))[:, dy : dy + hh, dx : dx + ww]
        if self.flip and (h >> 40) & 1:
            x = x.flip(-1)
        return x
