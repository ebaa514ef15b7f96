"""The report's latency-target section: asked, predicted and measured, then the layers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def latency_section(latency: Mapping[str, Any]) -> str:
    """Markdown for ``report["budget"]["latency"]`` (:func:`compressor.stages.latency_prediction`
    plus the ``measured`` part of :func:`compressor.stages.measure_latency_target`)."""
    asked, pred = latency["asked"], latency["predicted"]
    model = latency.get("model", {})
    measured = latency.get("measured") or {}
    how = (
        f"onnxruntime CPU, {asked['threads']} thread(s), {asked['input_size']} px, {asked['precision']}, "
        f"batch {asked['batch']}"
    )
    lines = [
        f"Latency target ({how}): asked ≤ {asked['fraction']:.3g} of the dense model's latency "
        f"({1 / asked['fraction']:.2f}× faster).",
        "",
        "| | fraction of dense | speedup | compressed (ms) | dense (ms) |",
        "|---|---:|---:|---:|---:|",
        f"| asked | {asked['fraction']:.3f} | {1 / asked['fraction']:.2f}× | | |",
        f"| predicted (latency model) | {pred['fraction']:.3f} | {pred['speedup']:.2f}× | {pred['ms']:.2f} | "
        f"{pred['dense_ms']:.2f} |",
    ]
    for b, m in (measured.get("network") or {}).items():
        lines.append(
            f"| measured, batch {b} | {m['fraction']:.3f} | {m['speedup']:.2f}× | {m['compressed_ms']:.2f} | "
            f"{m['dense_ms']:.2f} |"
        )
    lines.append("")
    if "fraction" in measured:
        verdict = "met" if measured["met"] else "not met"
        lines.append(
            f"At batch {asked['batch']} the target is **{verdict}**: measured {measured['fraction']:.3f} of dense "
            f"against {asked['fraction']:.3f} asked; the prediction ({measured['predicted_fraction']:.3f}) is "
            f"{100 * measured['prediction_error']:+.1f} % off the measurement ({measured['source']}; medians of "
            "runs interleaved with the dense model's, the same threads). On a shared machine both figures carry "
            "its load."
        )
        lines.append("")
    if model:
        networks = ", ".join(
            f"{label} {ms:.2f} ms (Σ tables {model['networks_tables_ms'].get(label, float('nan')):.2f})"
            for label, ms in model["networks_ms"].items()
        )
        lines.append(
            f"Latency model: {model['layer_shapes']} layer shapes, each form timed alone on a grid of ranks; the "
            f"network timed in three versions, {networks}, through which the network's time is a curve of the sum "
            f"of the tables (see docs/dlrt.md); {model['measured_graphs']} graphs timed in this run "
            f"({model['seconds']:.1f} s)."
        )
        lines.append("")
    lines += [
        "| layer | form | ranks | alone (ms) | dense alone (ms) | share of the network (ms) |",
        "|---|---|---|---:|---:|---:|",
    ]
    for name, d in latency["layers"].items():
        lines.append(
            f"| {name} | {d['form']} | {','.join(map(str, d['ranks']))} | {d['standalone_ms']:.2f} | "
            f"{d['dense_standalone_ms']:.2f} | {d['ms']:.2f} |"
        )
    alone = measured.get("layers_alone") or {}
    if alone:
        lines += [
            "",
            "The layers holding most of the predicted time, each timed alone in its exported form and dense "
            "(stand-alone graphs, side by side), against the tables' prediction for those graphs:",
            "",
            "| layer | form | predicted (ms) | measured (ms) | predicted dense (ms) | measured dense (ms) | "
            "form/dense predicted | form/dense measured |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, d in alone.items():
            lines.append(
                f"| {name} | {d['form']} | {d['predicted_ms']:.2f} | {d['measured_ms']:.2f} | "
                f"{d['predicted_dense_ms']:.2f} | {d['measured_dense_ms']:.2f} | {_ratio(d['predicted_fraction'])} | "
                f"{_ratio(d['measured_fraction'])} |"
            )
    return "\n".join(lines)


def _ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


__all__ = ["latency_section"]
