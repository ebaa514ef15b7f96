"""Timing whole networks, to tie the layers' stand-alone tables to the network they sit in.

The network is exported in a few versions — every factorized layer dense, every one in its
fastest form at its smallest timed ranks, and every one at ranks in the middle of its grid —
and the versions are timed side by side (in turns, so that all see the same load of the
machine). :class:`Calibration` holds their times, which :class:`~.model.LatencyModel` fits its
line through.
"""

from __future__ import annotations

import copy
import hashlib
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..layers import LatencyKey, low_rank_layers
from .settings import LatencySettings
from .timing import Timer

Version = Mapping[str, tuple[str, tuple[int, ...]]]
"""One version of the network: factorized layer → (form, ranks)."""


@dataclass(frozen=True)
class Calibration:
    """Milliseconds of the network in each version (label → ms), timed side by side."""

    networks: dict[str, float]

    @property
    def dense_ms(self) -> float:
        return self.networks["dense"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Calibration:
        return cls({str(k): float(v) for k, v in d["networks"].items()})


def layer_inputs(model: nn.Module, settings: LatencySettings) -> dict[str, tuple[int, ...]]:
    """The input shape of every factorized layer the forward calls, for one image of
    ``settings``' size (the batch is set by the timing)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            shapes.setdefault(name, tuple(inputs[0].shape))

        return hook

    layers = low_rank_layers(model)
    handles = [layer.register_forward_hook(record(n)) for n, layer in layers.items()]
    param = next(model.parameters())
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            size = settings.input_size
            model(torch.zeros(1, settings.in_chans, size, size, device=param.device, dtype=param.dtype))
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return shapes


def model_fingerprint(model: nn.Module, keys: Mapping[str, LatencyKey], settings: LatencySettings) -> str:
    """A hash of the network's structure (module types and hyper-parameters; the factorized
    layers by their latency keys, not their ranks) and input: the network's timings are
    cached under it."""
    lines = [f"input {settings.in_chans}x{settings.input_size}x{settings.input_size}"]
    low_rank = low_rank_layers(model)
    for name, module in model.named_modules():
        if name in low_rank:
            lines.append(f"{name} {keys[name] if name in keys else 'not called'}")
        elif not any(name.startswith(f"{lr}.") for lr in low_rank):
            lines.append(f"{name} {type(module).__qualname__}({module.extra_repr()})")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:32]


def network_in_forms(model: nn.Module, choice: Mapping[str, tuple[str, tuple[int, ...]]]) -> nn.Module:
    """A float32 CPU copy of ``model`` in eval mode with each factorized layer named in
    ``choice`` (layer → (form, ranks)) replaced by the plain modules of that form at those
    ranks, holding random weights: a graph for timing (forming the real weights of a large
    layer's dense form takes seconds, and their values do not change the time)."""
    net = copy.deepcopy(model).to("cpu", torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    for name, layer in low_rank_layers(net).items():
        if name not in choice:
            continue
        form, ranks = choice[name]
        meta = copy.deepcopy(layer).to("meta")
        meta.set_ranks_(tuple(ranks))
        with torch.device("meta"):
            module = meta.export_module(form)
        module = module.to_empty(device="cpu")
        with torch.no_grad():
            for p in module.parameters():
                p.uniform_(-0.05, 0.05, generator=generator)
        parent, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, child, module.eval())
    return net


def calibrate(
    model: nn.Module, versions: Mapping[str, Version], settings: LatencySettings, timer: Timer
) -> Calibration:
    """Export the network in each of ``versions`` (label → version) and time them side by side."""
    from ..export import export_onnx

    shape = (settings.batch, settings.in_chans, settings.input_size, settings.input_size)
    with tempfile.TemporaryDirectory(prefix="latency-") as tmp:
        nets = []
        for label, choice in versions.items():
            path = Path(tmp) / f"{label}.onnx"
            # only timed: no checker, no simplification (onnxruntime optimizes as it loads)
            export_onnx(
                network_in_forms(model, choice),
                path,
                input_size=settings.input_size,
                in_chans=settings.in_chans,
                check=False,
                simplify=False,
            )
            if settings.precision == "int8":
                from .quantized import quantize_file

                path = quantize_file(path, Path(tmp) / f"{label}.int8.onnx", shape)
            nets.append((path, shape))
        times = timer(nets, settings.threads)
    return Calibration(dict(zip(versions, times)))


__all__ = ["Calibration", "Version", "calibrate", "layer_inputs", "model_fingerprint", "network_in_forms"]
