"""Latency of the compressed model against the dense one (and INT8), timed side by side."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from ..export import ExportResult, export_onnx, onnx_latencies


def latency(exported: ExportResult, dense_model: nn.Module | None) -> dict[str, Any]:
    """Median onnxruntime latencies of the compressed model, the INT8 one and the dense one,
    interleaved (:func:`~compressor.export.onnx_latencies`), so that each speedup compares
    models under the same machine load; threads and repeats are the export section's."""
    section = exported.section
    assert section is not None
    shape = dict(input_size=exported.input_size, in_chans=exported.in_chans)
    paths: dict[str, Path] = {"compressed": exported.path("onnx")}
    if "int8" in exported.files:
        paths["int8"] = exported.path("int8")
    with tempfile.TemporaryDirectory() as tmp:
        if dense_model is not None:
            # a throwaway reference, only timed: no onnx.checker pass (onnxruntime validates
            # the graph as it loads it)
            paths["dense"] = Path(tmp) / "dense.onnx"
            export_onnx(dense_model.cpu().eval(), paths["dense"], opset=section.opset, check=False, **shape)
        out: dict[str, Any] = onnx_latencies(
            paths, threads=section.latency_threads, repeats=section.latency_repeats, **shape
        )
    base = out["compressed"]
    out["speedup"] = {
        other: {b: out[other][b]["median_ms"] / base[b]["median_ms"] for b in base}
        for other in ("dense",)
        if other in out
    }
    if "int8" in out:  # how much faster the INT8 model is than the FP32 compressed one
        out["speedup"]["int8_vs_compressed"] = {b: base[b]["median_ms"] / out["int8"][b]["median_ms"] for b in base}
    out["threads"] = section.latency_threads
    return out
