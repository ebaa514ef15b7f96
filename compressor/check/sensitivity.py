"""INT8 remedy: the fewest most sensitive layers kept in float (mixed precision).

Each quantizable unit (:func:`~compressor.export.quantize.quantizable_units`: one plain layer,
or the two or three factors of one factorized layer) is scored by leaving it alone in float
with everything else quantized (the search's calibration), on the first
:data:`SENSITIVITY_IMAGES` validation images: the signal-to-quantization-noise ratio of the
logits against the FP32 model's, SQNR = 10 log10(Σ z² / Σ (ẑ − z)²) dB (the measure of
onnxruntime's ``qdq_loss_debug``; layer-wise sensitivity as in Nagel et al., "A White Paper on
Neural Network Quantization", 2021, §3.7). The unit whose float copy recovers the most is the
most sensitive. Units are then kept in float in that order, one more per candidate, each
candidate scored on the whole validation split, until INT8 is within the tolerance or
:data:`MAX_FLOAT_FRACTION` of the units are float.

Leaving one out ranks better than quantizing one at a time: the quantization errors of a
deep network compound, and a unit quantized alone shows its own error, not its share of the
compounded one (on EfficientNet-Lite0 the one-at-a-time order needed 13 units in float to come
within 1 point, leaving one out 3; docs/int8.md).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from ..export.quantize import quantizable_units
from .float_units import float_unit
from .remedies import Candidate, describe, register_remedy

if TYPE_CHECKING:
    from .int8 import Int8Search

log = logging.getLogger(__name__)

SENSITIVITY_IMAGES = 128
"""Validation images each unit's sensitivity is measured on (a few batches)."""

MAX_FLOAT_FRACTION = 0.5
"""At most this share of the units is kept in float: beyond it INT8 has little speed left."""

_SQNR_CAP = 200.0  # dB: logits equal to the float ones (no noise at all)


def sqnr(reference: np.ndarray, quantized: np.ndarray) -> float:
    """10 log10(Σ z² / Σ (ẑ − z)²) in dB, capped at 200 dB when the two are equal."""
    noise = float(np.sum((quantized.astype(np.float64) - reference) ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    if noise <= signal * 10 ** (-_SQNR_CAP / 10):
        return _SQNR_CAP
    return 10 * math.log10(signal / noise) if signal > 0 else -_SQNR_CAP


def rank_units(search: Int8Search, base: dict[str, Any], n_images: int = SENSITIVITY_IMAGES) -> dict[str, Any]:
    """Each unit's logit SQNR with that unit alone in float (everything else quantized as
    ``base`` says; :func:`~.float_units.float_unit` of one quantized model), most sensitive
    first; and the SQNR with every unit quantized."""
    import onnx

    units = quantizable_units(search.source())
    reference = search.logits(search.source(), n_images)
    path = search.workdir / "sensitivity.onnx"
    search.quantize(Candidate("all quantized", base), path)
    everything = sqnr(reference, search.logits(path, n_images))
    quantized, fp32 = onnx.load(str(path)), onnx.load(str(search.source()))
    path.unlink()
    scores = {}
    for unit, nodes in units.items():
        model = float_unit(quantized, fp32, set(nodes)).SerializeToString()
        scores[unit] = sqnr(reference, search.logits(model, n_images))
    ranked = dict(sorted(scores.items(), key=lambda kv: -kv[1]))  # stable: graph order among equals
    log.info("INT8 sensitivity (logit SQNR, all quantized %.1f dB): %s", everything,
             ", ".join(f"{u} {s:.1f}" for u, s in list(ranked.items())[:5]))  # fmt: skip
    return {
        "method": "leave one out",
        "metric": "logit SQNR (dB) against FP32 with the layer alone in float",
        "images": int(min(n_images, len(reference))),
        "all_quantized_db": everything,
        "layers": ranked,
    }


@register_remedy(order=200)
class SensitiveLayers:
    """The most sensitive units in float, one more per candidate, until INT8 holds."""

    name = "sensitive layers in float"

    def candidates(self, search: Int8Search) -> Iterable[Candidate]:
        base = search.calibration_options()
        ranking = rank_units(search, base)
        search.notes["sensitivity"] = ranking
        units = list(ranking["layers"])
        kept: list[str] = []
        for unit in units[: max(1, math.ceil(MAX_FLOAT_FRACTION * len(units)))]:
            kept.append(unit)
            options = {**base, "float_layers": tuple(kept)}
            yield Candidate(describe(options), options)
            if search.within(search.tried[-1]["clean_accuracy"]):
                return
