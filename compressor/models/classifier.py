"""The normalizing wrapper every model is handed on as, its normalization defaults, and what was built."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

DEFAULT_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
DEFAULT_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
"""Normalization used when neither the caller nor loaded pretrained weights give one."""

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


class NormalizedClassifier(nn.Module):
    """``net((x - mean) / std)`` for images ``x`` in [0, 1]; ``mean``/``std`` are 1×C×1×1 buffers.

    The buffers are persistent, so a saved state dict (``mean``, ``std``, ``net.*``) carries the
    normalization with the weights.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, net: nn.Module, mean: list[float] | tuple[float, ...], std: list[float] | tuple[float, ...]):
        super().__init__()
        if len(mean) != len(std):
            raise ConfigError(f"mean has {len(mean)} values but std has {len(std)}: give one per input channel")
        if any(s <= 0 for s in std):
            raise ConfigError(f"std must be positive, got {list(std)}")
        self.net = net
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) pixels in [0, 1] → the net's normalized input."""
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, H, W) in [0, 1] → logits (B, num_classes)
        return self.net(self.normalize(x))


@dataclass
class ModelInfo:
    """What was built: recorded beside the outputs and used by later stages."""

    source: str
    """"torchvision" or "timm"."""
    name: str
    """Canonical name within the library, e.g. "vgg16" or "resnet18.a1_in1k"."""
    spec: str
    """The name as the user typed it."""
    num_classes: int
    in_chans: int
    input_size: int
    mean: list[float]
    std: list[float]
    weights: str
    """Where the weights came from: "random-init", "pretrained (torchvision DEFAULT)", "file:<path>", ..."""
    head: str = ""
    """Module name of the classifier head inside ``net`` (e.g. "classifier.6", "fc", "heads.head")."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of (distinct) parameters; ``trainable_only`` counts those with requires_grad."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
