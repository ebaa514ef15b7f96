"""INT8 calibration images: the first training images of epoch 0, as the run drew them.

The pipeline and ``compress export`` take the same images (the loader's epoch set to 0, so a
seeded sampler yields the order the run's first epoch had), so that re-exporting a saved model
calibrates it as its run did.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ..data import set_epoch
from ..runtime.batches import first_images

CALIBRATION_IMAGES = 256
"""Training images INT8 is calibrated on (a few hundred cover the activation ranges)."""


def calibration_images(train_loader: Any, n: int = CALIBRATION_IMAGES) -> Tensor:
    """The first ``n`` images of ``train_loader``'s epoch 0 (N, C, H, W in [0, 1])."""
    set_epoch(train_loader, 0)
    return first_images(train_loader, n)
