"""Plain ``nn.Linear`` / ``nn.Conv2d`` holding given weights: the ops of an exported form."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


def plain_linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` computing x·weightᵀ (+ bias)."""
    m = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        m.weight.copy_(weight)
        if bias is not None:
            m.bias.copy_(bias)
    return m


def plain_conv(weight: Tensor, bias: Tensor | None, **kw: Any) -> nn.Conv2d:
    """An ``nn.Conv2d`` with kernel ``weight`` (C_out × C_in × kh × kw); ``kw``: stride, padding, dilation."""
    m = nn.Conv2d(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), bias=bias is not None, **kw)
    with torch.no_grad():
        m.weight.copy_(weight)
        if bias is not None:
            m.bias.copy_(bias)
    return m
