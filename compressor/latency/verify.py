"""What a latency target reached: the exported graph timed against the dense one, and the layers
that hold most of the time timed alone against their prediction."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..layers import low_rank_layers
from .model import LatencyModel
from .networks import layer_inputs
from .settings import LatencySettings
from .timing import Timer, form_ops, time_onnx, write_form_graph

TOP_SHARE = 0.8
"""The layers reported one by one: the slowest, until they hold this share of the layers' time."""


def network_latency(
    compressed: nn.Module,
    dense: nn.Module,
    settings: LatencySettings,
    *,
    batch_sizes: Sequence[int],
    repeats: int,
    compressed_onnx: str | Path | None = None,
    calibration: Any = None,
) -> dict[str, Any]:
    """The compressed and the dense network timed side by side (:func:`~compressor.export.onnx_latencies`,
    interleaved) at ``settings``' threads and input size, at each of ``batch_sizes``:
    {batch: {compressed_ms, dense_ms, speedup, fraction}}. ``compressed_onnx``: the exported
    graph (used as it is; otherwise the model is exported here, at the settings' input size);
    with precision int8 it is the INT8 graph (quantized here with ``calibration`` images, or
    random ones, when not given), against the FP32 dense one."""
    from ..export import export_onnx, onnx_latencies, quantize_int8

    shape = dict(input_size=settings.input_size, in_chans=settings.in_chans)
    with tempfile.TemporaryDirectory(prefix="latency-check-") as tmp:
        paths = {"dense": Path(tmp) / "dense.onnx"}
        export_onnx(dense.cpu().eval(), paths["dense"], check=False, **shape)
        if compressed_onnx is None:
            compressed_onnx = Path(tmp) / "compressed.onnx"
            export_onnx(compressed.cpu().eval(), compressed_onnx, check=False, **shape)
            if settings.precision == "int8":
                import torch

                images = calibration
                if images is None:
                    size = settings.input_size
                    images = torch.rand(64, settings.in_chans, size, size, generator=torch.Generator().manual_seed(0))
                quantize_int8(compressed_onnx, Path(tmp) / "compressed.int8.onnx", images)
                compressed_onnx = Path(tmp) / "compressed.int8.onnx"
        paths["compressed"] = Path(compressed_onnx)
        lat = onnx_latencies(paths, batch_sizes=tuple(batch_sizes), threads=settings.threads, repeats=repeats, **shape)
    out = {}
    for b in batch_sizes:
        c, d = lat["compressed"][int(b)]["median_ms"], lat["dense"][int(b)]["median_ms"]
        out[int(b)] = {"compressed_ms": c, "dense_ms": d, "speedup": d / c, "fraction": c / d}
    return out


def from_export_latency(
    export_latency: Mapping[str, Any], key: str, batch_sizes: Sequence[int]
) -> dict[str, Any] | None:
    """The same figures from the export's latency check (``key``: its compressed or int8
    entry), when it timed every batch size asked for beside the dense model; else None."""
    if not export_latency or "dense" not in export_latency or key not in export_latency:
        return None

    def at(entry: Mapping[Any, Any], b: int) -> float | None:
        stats = entry.get(b, entry.get(str(b)))
        return None if stats is None else float(stats["median_ms"])

    out = {}
    for b in batch_sizes:
        c, d = at(export_latency[key], int(b)), at(export_latency["dense"], int(b))
        if c is None or d is None:
            return None
        out[int(b)] = {"compressed_ms": c, "dense_ms": d, "speedup": d / c, "fraction": c / d}
    return out


def slowest_layers(predicted: Mapping[str, Mapping[str, Any]], share: float = TOP_SHARE) -> list[str]:
    """The layers of a prediction (:meth:`LatencyModel.predict`'s ``layers``), slowest first,
    until they hold ``share`` of the layers' predicted time."""
    order = sorted(predicted, key=lambda n: -predicted[n]["ms"])
    total = sum(max(0.0, predicted[n]["ms"]) for n in order)
    out, held = [], 0.0
    for name in order:
        if held >= share * total and out:
            break
        out.append(name)
        held += max(0.0, predicted[name]["ms"])
    return out


def layers_alone(
    model: nn.Module, latency: LatencyModel, names: Sequence[str], *, timer: Timer = time_onnx
) -> dict[str, dict[str, Any]]:
    """Each named layer in its exported form at its ranks, and dense, timed as stand-alone
    graphs side by side, beside what the tables predict for those graphs (at the load the
    network was timed under, so a common factor between all predicted and measured figures
    is the machine's load now)."""
    settings = latency.settings
    layers = low_rank_layers(model)
    inputs = layer_inputs(model, settings)
    chosen, times = {}, []
    with tempfile.TemporaryDirectory(prefix="latency-layers-") as tmp:
        for i, name in enumerate(names):
            ranks = tuple(layers[name].ranks)
            form = latency.layer_ms(name, ranks)[0]
            shape = (settings.batch, *inputs[name][1:])
            graphs = []
            for label, f in (("form", form), ("dense", "dense")):
                ops = form_ops(layers[name], f, ranks)
                graphs.append((write_form_graph(ops, Path(tmp) / f"{i}{label}.onnx", shape, settings), shape))
            times += timer(graphs, settings.threads)  # the pair side by side
            chosen[name] = (form, ranks)
    out = {}
    for i, (name, (form, ranks)) in enumerate(chosen.items()):
        predicted, predicted_dense = (
            latency.standalone_ms(name, form, ranks),
            latency.standalone_ms(name, "dense", ranks),
        )
        measured, measured_dense = times[2 * i], times[2 * i + 1]
        out[name] = {
            "form": form,
            "ranks": list(ranks),
            "predicted_ms": predicted,
            "measured_ms": measured,
            "predicted_dense_ms": predicted_dense,
            "measured_dense_ms": measured_dense,
            "predicted_fraction": predicted / predicted_dense if predicted_dense > 0 else None,
            "measured_fraction": measured / measured_dense if measured_dense > 0 else None,
        }
    return out


__all__ = ["TOP_SHARE", "from_export_latency", "layers_alone", "network_latency", "slowest_layers"]
