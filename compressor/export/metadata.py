"""What a deployer needs to run an exported model without compressor or torch.

One JSON document, :func:`deployment_metadata`, goes into every artifact: the ONNX model's
``metadata_props`` under :data:`DEPLOYMENT_KEY`, the safetensors manifest (``deployment``) and the
run's report.json. It says what goes in (shape, layout, value range, colour, how to resize),
what comes out (class names in index order) and what was done to the model (compression).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..layers import low_rank_layers
from ..runtime import compression_stats

DEPLOYMENT_KEY = "compressor.deployment"
"""The ONNX ``metadata_props`` key holding :func:`deployment_metadata` as JSON."""

DEFAULT_PREPROCESS: dict[str, Any] = {
    "color": "RGB",
    "resize": {"method": "bilinear", "align_corners": False, "antialias": "when shrinking", "keeps_aspect": False},
    "value_range": [0.0, 1.0],
    "scale": "8-bit pixels / 255",
    "layout": "NCHW float32",
    "normalization": "inside the model (its mean/std); feed [0, 1] pixels",
}
"""For a model whose data set is not known: RGB images scaled to [0, 1], bilinear resize."""


def _version() -> str:
    from .. import __version__

    return __version__


def _normalization(model: nn.Module, model_info: Mapping[str, Any] | None) -> dict[str, Any] | None:
    info = model_info or {}
    mean, std = info.get("mean"), info.get("std")
    if mean is None and isinstance(getattr(model, "mean", None), torch.Tensor):
        mean, std = model.mean.flatten().tolist(), model.std.flatten().tolist()
    return {"inside_model": True, "mean": mean, "std": std} if mean is not None else None


def deployment_metadata(
    model: nn.Module,
    *,
    input_size: int,
    in_chans: int,
    class_names: Sequence[str] | None = None,
    preprocess: Mapping[str, Any] | None = None,
    model_info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The deployment document for ``model`` at its current ranks (see the module docstring)."""
    info = dict(model_info or {})
    stats = compression_stats(model)
    prep = dict(preprocess or DEFAULT_PREPROCESS)
    resize = dict(prep.get("resize") or {})
    resize["size"] = [input_size, input_size]
    prep["resize"] = resize
    return {
        "compressor_version": _version(),
        "model": {k: info[k] for k in ("source", "name", "spec") if k in info},
        "input": {
            "name": "input",
            "shape": ["batch", in_chans, input_size, input_size],
            "dtype": "float32",
            "layout": "NCHW",
            "value_range": [0.0, 1.0],
            "channel_order": "RGB" if in_chans == 3 else ("gray" if in_chans == 1 else f"{in_chans} channels"),
        },
        "preprocess": prep,
        "normalization": _normalization(model, info),
        "output": {"name": "logits", "meaning": "unnormalized class scores (softmax for probabilities)"},
        "class_names": list(class_names) if class_names is not None else None,
        "compression": {
            "compression_rate": stats.rate,
            "params": stats.params,
            "params_dense": stats.params_dense,
            "ranks": {name: list(layer.ranks) for name, layer in low_rank_layers(model).items()},
        },
    }


def onnx_metadata(deployment: Mapping[str, Any]) -> dict[str, str]:
    """``metadata_props`` entries (strings) for an ONNX model."""
    return {
        DEPLOYMENT_KEY: json.dumps(deployment, sort_keys=True, allow_nan=False),
        "compressor.version": str(deployment.get("compressor_version", "")),
    }
