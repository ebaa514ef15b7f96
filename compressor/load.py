"""A compressed model back from its model.safetensors alone: the architecture by name, then the file.

The manifest that :func:`compressor.export.save_compressed` writes names the model
create_model built (source, name, classes, channels, input size, normalization).
:func:`load_compressed` builds that dense skeleton here, above export/, so that export/ imports
no model-building code; :func:`compressor.export.load_into` then factorizes the listed
layers at their recorded ranks and loads every tensor strictly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, WeightsError
from .export.safetensors_io import CUSTOM_SOURCE, load_into, model_spec, read_compressed


def rebuild_model(path: str | Path, manifest: dict[str, Any]) -> nn.Module:
    """The dense model a manifest's ``model`` section names, built by create_model (random weights)."""
    m = manifest["model"]
    if m["source"] == CUSTOM_SOURCE:
        raise WeightsError(
            f"{path} holds a {m['name']} (a model not built by create_model): pass load_compressed(path, "
            f"model=<a new {m['name']}>) so that its weights have an architecture to go into"
        )
    from .models import create_model

    spec = model_spec(m)
    try:
        model, _ = create_model(
            spec, m["num_classes"], in_chans=m["in_chans"], input_size=m["input_size"], mean=m["mean"], std=m["std"]
        )
    except ConfigError as err:
        raise WeightsError(f"{path}: cannot rebuild its model {spec!r}: {err}") from None
    return model


def load_compressed(
    path: str | Path, *, model: nn.Module | None = None, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model saved by :func:`~compressor.export.save_compressed`; return (model in eval mode, manifest).

    For a model built by create_model the file alone suffices: the architecture comes from
    create_model by name. For any other module pass ``model``, a freshly built (dense) instance
    of the same architecture: its layers listed in the manifest are replaced by factorized ones
    in place. Then every tensor comes from the file (strict load). Raises WeightsError for a
    missing, corrupt, truncated or foreign file, a missing or malformed manifest, or tensors
    that do not match the manifest or the architecture.
    """
    p = Path(path)
    if model is None:
        _, manifest = read_compressed(p)  # the file is checked before any model is built
        model = rebuild_model(p, manifest)
    return load_into(p, model, map_location=map_location)
