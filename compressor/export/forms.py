"""Which form each factorized layer takes in an exported graph, and the plain model that holds it.

Before export every factorized layer is rewritten into ordinary ``nn.Conv2d``/``nn.Linear``
modules holding its factors (:func:`plan_export` decides the form, :func:`plain_model` builds
it with each layer's ``export_module``), so any runtime runs the graph and the exporter cannot
fold the factors back into a dense weight: each factor is consumed by an op whose other input
is an activation.

Forms (``fold="auto"``): among the layer's ``export_forms`` with no more weights than its
trained form, the one with the fewest multiply-adds (``LowRankLayer.costs``); ties keep the more
factored form. A LowRankLinear (W = U S Vᵀ) becomes ``merged`` (x·(V Sᵀ)·Uᵀ + b, two
MatMul/Gemm) or ``dense`` near full rank; a TuckerConv2d ``tucker3`` (Conv 1×1 → k×k → 1×1),
``fold_out``, ``fold_in`` or ``dense`` when one of them is cheaper, which needs a rank near its
channel count (see each class). ``fold="none"`` keeps the trained form, for comparison.

A layer whose ``export_form`` attribute names one of its forms (set by a latency budget,
:func:`compressor.latency.set_export_forms`: the fastest form measured at the layer's final
ranks, ``dense`` included) takes that form under ``fold="auto"``; the multiply-add rule
applies to the others. The attribute lives on the module, not in the safetensors manifest.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..layers import low_rank_layers

EXPORT_FORM_ATTR = "export_form"
"""The attribute of a factorized layer naming the form a latency model measured fastest."""

PLAN_KEY = "compressor.export_plan"
"""The ONNX ``metadata_props`` key holding {layer: form} of the exported graph."""


@dataclass(frozen=True)
class LayerForm:
    """How one factorized layer is written into the graph."""

    kind: str  # the layer's kind (compressor.layers.layer_kinds)
    form: str  # one of the layer's forms: "unmerged" | "merged" | "tucker3" | "fold_out" | "fold_in" | "dense"
    params: int  # weights of this form (bias included)
    macs: int  # multiply-adds per output token/pixel


def plan_export(model: nn.Module, fold: str = "auto", *, called: set[str] | None = None) -> dict[str, LayerForm]:
    """Layer name → the form it is exported in (see the module docstring). ``called``: the
    layers the model's forward calls (:func:`called_layers`); the others are read through their
    ``.weight`` by their parent and are written dense, as the parent uses them."""
    if fold not in ("auto", "none"):
        raise ConfigError(f"fold must be 'auto' or 'none', got {fold!r}")
    plan = {}
    for name, layer in low_rank_layers(model).items():
        if not layer.forms:  # a LowRankLayer that states no forms: export its own forward
            continue
        costs = layer.costs()
        if called is not None and name not in called:
            plan[name] = LayerForm(layer.kind, "dense", *costs["dense"])
            continue
        base = layer.trained_form
        measured = getattr(layer, EXPORT_FORM_ATTR, None)
        if fold == "none":
            choice = base
        elif measured in layer.forms:
            choice = measured
        else:
            limit = costs[base][0]
            allowed = [f for f in layer.export_forms if costs[f][0] <= limit]
            choice = min(allowed, key=lambda f: costs[f][1])  # min keeps the first of equals
        plan[name] = LayerForm(layer.kind, choice, *costs[choice])
    return plan


@torch.no_grad()
def called_layers(model: nn.Module, example: Tensor) -> set[str]:
    """Names of the factorized layers that ``model``'s forward calls on ``example`` (a layer read
    only through ``.weight`` is not called)."""
    seen: set[str] = set()
    handles = [
        layer.register_forward_hook(lambda m, i, o, name=name: seen.add(name))
        for name, layer in low_rank_layers(model).items()
    ]
    was = model.training
    param = next(model.parameters(), None)
    try:
        model.eval()
        model(example.to(param.device, param.dtype) if param is not None else example)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return seen


def plain_model(model: nn.Module, plan: dict[str, LayerForm]) -> nn.Module:
    """A float32 CPU copy of ``model`` in eval mode with the planned layers made plain.

    Tensors outside the rewritten layers are shared with ``model`` (no copy) when it is
    already float32 on the CPU.
    """
    tensors = list(model.parameters()) + list(model.buffers())
    if all(t.device.type == "cpu" and (not t.is_floating_point() or t.dtype == torch.float32) for t in tensors):
        memo = {id(t): t for t in tensors}
        plain = copy.deepcopy(model, memo)
    else:
        plain = copy.deepcopy(model).to("cpu", torch.float32)
    layers = low_rank_layers(plain)
    for name, form in plan.items():
        parent, _, child = name.rpartition(".")
        new = layers[name].export_module(form.form)
        setattr(plain.get_submodule(parent) if parent else plain, child, new)
    return plain.eval()
