"""``create_model``: a model name → a head-fitted, weight-loaded :class:`NormalizedClassifier`."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, WeightsError
from ._hub import _hub_offline, _PretrainedUnavailable, _timm_create, _timm_pretrained, _tv_pretrained
from ._messages import _short
from .classifier import DEFAULT_MEAN, DEFAULT_STD, ModelInfo, NormalizedClassifier, count_parameters
from .heads import find_head
from .names import resolve_name
from .weights import load_net_weights

log = logging.getLogger(__name__)


def _check_channels(values: list[float] | tuple[float, ...] | None, what: str, in_chans: int) -> list[float] | None:
    if values is None:
        return None
    vals = [float(v) for v in values]
    if len(vals) == 1 and in_chans > 1:
        vals = vals * in_chans
    if len(vals) != in_chans:
        raise ConfigError(
            f"{what} has {len(vals)} values but the model takes {in_chans} channels: give one per channel"
        )
    return vals


def _tv_extra_kwargs(name: str, in_chans: int, input_size: int) -> dict[str, Any]:
    """Extra torchvision constructor kwargs; rejects what torchvision cannot build."""
    if in_chans != 3:
        raise ConfigError(f"torchvision models take 3 input channels, not {in_chans}: use in_chans=3 or a timm: model")
    extra: dict[str, Any] = {}
    m = re.fullmatch(r"vit_[a-z]_(\d+)", name)
    if m:
        patch = int(m.group(1))
        if input_size % patch:
            raise ConfigError(
                f"{name} needs input_size divisible by its patch size {patch}, got {input_size}: "
                f"set model.input_size to e.g. {max(patch, round(input_size / patch) * patch)}"
            )
        extra["image_size"] = input_size
    if name in ("googlenet", "inception_v3"):
        extra["aux_logits"] = False
        extra["init_weights"] = True  # silences torchvision's FutureWarning; the init it used anyway
    return extra


def _pick_norm(
    given: list[float] | None, trained: list[float] | None, default: float, in_chans: int, what: str
) -> list[float]:
    if given is None:
        return list(trained) if trained is not None else [default] * in_chans
    if trained is not None and not torch.allclose(torch.tensor(given), torch.tensor(trained), atol=1e-4):
        log.warning(
            "%s %s overrides the %s the weights were trained with (%s): pass none to keep theirs",
            what,
            [round(v, 4) for v in given],
            what,
            [round(v, 4) for v in trained],
        )
    return list(given)


def _check_forward(net: nn.Module, in_chans: int, input_size: int, num_classes: int, spec: str) -> None:
    """One zero image through the net, so a too small input_size fails here, clearly."""
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            out = net(torch.zeros(1, in_chans, input_size, input_size))
    except Exception as err:
        raise ConfigError(
            f"model {spec!r} does not run on {input_size}x{input_size} inputs ({_short(err)}): "
            "increase model.input_size"
        ) from None
    finally:
        net.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(
            f"model {spec!r} returns {got}, not (batch, {num_classes}) logits: use a classification model"
        )


def create_model(
    name: str,
    num_classes: int,
    *,
    in_chans: int = 3,
    weights: str | Path | None = None,
    pretrained: bool = False,
    mean: list[float] | tuple[float, ...] | None = None,
    std: list[float] | tuple[float, ...] | None = None,
    input_size: int = 32,
) -> tuple[NormalizedClassifier, ModelInfo]:
    """Build ``name`` for ``num_classes`` classes, wrapped in a :class:`NormalizedClassifier`.

    Args:
        name: bare (``vgg16``: torchvision first, then timm — :data:`BARE_NAME_ORDER`) or
            prefixed (``tv:vgg16``, ``timm:vgg16``, ``timm:resnet18.a1_in1k``).
        num_classes: outputs of the (replaced) classifier head.
        in_chans: input channels (torchvision models: 3 only).
        weights: local ``.safetensors``/``.pth``/``.pt``/``.bin`` state dict, for the bare net or
            for a NormalizedClassifier. Takes precedence over ``pretrained``. A head with another
            number of classes is skipped; any other mismatch raises WeightsError.
        pretrained: try the library's pretrained weights; offline this logs a warning and keeps
            random init (``ModelInfo.weights`` says why).
        mean, std: per-channel normalization in [0, 1] pixel units. Precedence: these
            arguments; else ``mean``/``std`` stored in a NormalizedClassifier weight file; else
            the library's values when pretrained weights were really loaded (ImageNet); else
            :data:`DEFAULT_MEAN`/:data:`DEFAULT_STD` (0.5). Passing them overrides the statistics
            a pretrained or saved net was trained with (logged as a warning when they differ).
        input_size: square input side; ViTs are built for it (torchvision: multiple of the patch).

    Returns:
        (model in train mode on the CPU, :class:`ModelInfo`).
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive int, got {num_classes!r}")
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
        raise ConfigError(f"in_chans must be a positive int, got {in_chans!r}")
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
        raise ConfigError(f"input_size must be a positive int, got {input_size!r}")
    mean_arg = _check_channels(mean, "mean", in_chans)
    std_arg = _check_channels(std, "std", in_chans)
    source, canonical = resolve_name(name)

    if weights is not None and pretrained:
        log.info("model.weights is set: loading %s instead of the library's pretrained weights", weights)
        pretrained = False

    lib_mean: list[float] | None = None
    lib_std: list[float] | None = None
    desc = "random-init"
    net: nn.Module | None = None
    timm_kwargs: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_chans, "img_size": input_size}
    tv_extra = _tv_extra_kwargs(canonical, in_chans, input_size) if source == "torchvision" else {}

    if pretrained:
        try:
            if source == "torchvision":
                net, lib_mean, lib_std, desc = _tv_pretrained(canonical, num_classes, input_size, tv_extra)
            else:
                net, lib_mean, lib_std, desc = _timm_pretrained(canonical, timm_kwargs)
        except _PretrainedUnavailable as err:
            log.warning(
                "pretrained weights for %s:%s unavailable (%s); continuing from random init. "
                "To start from trained weights offline, give a local file: model.weights=<path.safetensors|.pth> "
                "(CLI --weights), or train the dense baseline first (baseline.epochs > 0)%s",
                source,
                canonical,
                err,
                ""
                if _hub_offline()
                else "; on a machine without network, HF_HUB_OFFLINE=1 skips the download attempts",
            )
            desc = f"random-init (pretrained unavailable: {err})"

    if net is None:
        if source == "torchvision":
            import torchvision.models as tvm

            net = tvm.get_model(canonical, weights=None, num_classes=num_classes, **tv_extra)
        else:
            import timm

            net = _timm_create(timm, canonical, pretrained=False, **timm_kwargs)

    head, _ = find_head(net)
    file_norm: dict[str, torch.Tensor] = {}
    if weights is not None:
        desc, file_norm = load_net_weights(net, weights, head=head)

    # normalization: explicit > stored with the weights > pretrained library > 0.5
    stored = {k: v.flatten().tolist() for k, v in file_norm.items()}
    if any(len(v) != in_chans for v in stored.values()):
        raise WeightsError(
            f"weights file {weights}: stored mean/std do not have {in_chans} channels; re-save the model"
        )
    trained_mean = stored.get("mean", lib_mean)
    trained_std = stored.get("std", lib_std)
    final_mean = _pick_norm(mean_arg, trained_mean, DEFAULT_MEAN[0], in_chans, "mean")
    final_std = _pick_norm(std_arg, trained_std, DEFAULT_STD[0], in_chans, "std")

    _check_forward(net, in_chans, input_size, num_classes, name)
    model = NormalizedClassifier(net, final_mean, final_std)
    info = ModelInfo(
        source=source,
        name=canonical,
        spec=name,
        num_classes=num_classes,
        in_chans=in_chans,
        input_size=input_size,
        mean=[float(v) for v in final_mean],
        std=[float(v) for v in final_std],
        weights=desc,
        head=head,
    )
    log.info(
        "model %s:%s, %d classes, %d parameters, weights: %s",
        source,
        canonical,
        num_classes,
        count_parameters(model),
        desc,
    )
    return model, info
