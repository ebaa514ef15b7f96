"""Pretrained weights from torchvision and timm, with one offline switch (``HF_HUB_OFFLINE``) for both."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from ._messages import _short
from .classifier import IMAGENET_MEAN, IMAGENET_STD
from .heads import _drop_aux_heads, replace_head


class _PretrainedUnavailable(Exception):
    """Internal: the library's pretrained weights could not be had (reason in the message)."""


def _hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub read it, so torchvision and timm obey one switch."""
    from huggingface_hub import constants  # installed with timm

    return bool(constants.HF_HUB_OFFLINE)


def _torch_hub_file(url: str) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` keeps the download of ``url``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _tv_pretrained(
    name: str, num_classes: int, input_size: int, extra: dict[str, Any]
) -> tuple[nn.Module, list[float], list[float], str]:
    import torchvision.models as tvm

    try:
        weights = tvm.get_model_weights(name).DEFAULT
    except Exception as err:  # no weights enum for this model
        raise _PretrainedUnavailable(f"torchvision has no pretrained weights for {name} ({_short(err)})") from None
    cached = _torch_hub_file(weights.url)
    if _hub_offline() and not cached.is_file():
        # torchvision has no offline switch of its own: it would try the download
        raise _PretrainedUnavailable(f"offline (HF_HUB_OFFLINE=1) and {cached} not cached")
    try:
        if name.startswith("vit_") and "image_size" in extra and extra["image_size"] != weights.meta["min_size"][0]:
            # ImageNet weights are for 224 px: interpolate the position embeddings to our size
            from torchvision.models.vision_transformer import interpolate_embeddings

            src = tvm.get_model(name, weights=weights)
            state = interpolate_embeddings(extra["image_size"], src.patch_size, src.state_dict())
            net = tvm.get_model(name, weights=None, **extra)
            net.load_state_dict(state)
        else:
            net = tvm.get_model(name, weights=weights)
    except Exception as err:  # no network, a refused or corrupt download: all end in random init
        raise _PretrainedUnavailable(_short(err)) from None
    tf = weights.transforms()
    mean = [float(v) for v in getattr(tf, "mean", IMAGENET_MEAN)]
    std = [float(v) for v in getattr(tf, "std", IMAGENET_STD)]
    _drop_aux_heads(net)
    replace_head(net, num_classes)
    return net, mean, std, f"pretrained (torchvision {weights})"


def _timm_pretrained(name: str, kwargs: dict[str, Any]) -> tuple[nn.Module, list[float], list[float], str]:
    """timm's own loader: its Hugging Face hub download obeys ``HF_HUB_OFFLINE`` and uses the
    hub cache; its URL weights go through torch.hub, which has no offline switch, so that case is
    checked here."""
    import timm
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        raise _PretrainedUnavailable(f"timm has no pretrained weights for {name}")
    hub_id, url, file = getattr(cfg, "hf_hub_id", None), getattr(cfg, "url", None), getattr(cfg, "file", None)
    if not (hub_id or url or file):
        # timm would log a warning and hand back random init labelled as pretrained
        raise _PretrainedUnavailable(f"timm lists no weight source for {name}")
    if _hub_offline() and url and not (hub_id or file) and not _torch_hub_file(url).is_file():
        raise _PretrainedUnavailable(f"offline (HF_HUB_OFFLINE=1) and {_torch_hub_file(url)} not cached")
    try:
        net = _timm_create(timm, name, pretrained=True, **kwargs)
    except Exception as err:  # no network, no cached copy, a corrupt download: all end in random init
        from huggingface_hub.utils import LocalEntryNotFoundError

        if _hub_offline() and isinstance(err, LocalEntryNotFoundError):  # its text blames the connection
            raise _PretrainedUnavailable(f"offline (HF_HUB_OFFLINE=1) and {hub_id} not cached") from None
        raise _PretrainedUnavailable(_short(err)) from None
    pcfg = getattr(net, "pretrained_cfg", {}) or {}
    mean = [float(v) for v in pcfg.get("mean", IMAGENET_MEAN)]
    std = [float(v) for v in pcfg.get("std", IMAGENET_STD)]
    return net, mean, std, f"pretrained (timm {pcfg.get('hf_hub_id') or name})"


def _timm_create(timm: Any, name: str, **kwargs: Any) -> nn.Module:
    """timm.create_model, dropping ``img_size`` for architectures that do not take it (CNNs)."""
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as err:
        if "img_size" in kwargs and "img_size" in str(err):
            kwargs = {k: v for k, v in kwargs.items() if k != "img_size"}
            return timm.create_model(name, **kwargs)
        raise
