"""INT8 accuracy against FP32, with remedies tried in turn until INT8 is close enough.

:func:`compressor.export.export_model` writes the INT8 model with
:func:`~compressor.export.quantize_int8`'s defaults (static QDQ, weights per channel, MinMax
calibration). Here it is scored on the validation data beside the FP32 ONNX model; when it loses
more than :data:`INT8_MAX_DROP` of clean accuracy, the registered remedies
(:mod:`compressor.check.remedies`) are tried in turn, each re-quantizing the FP32 model; the best
candidate replaces the file, and the report lists every candidate tried.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from ..errors import ConfigError
from ..evaluate import evaluate_onnx
from ..export import ExportResult, quantize_int8
from .remedies import Candidate, list_remedies

log = logging.getLogger(__name__)

INT8_MAX_DROP = 0.01
"""INT8 clean accuracy may fall this far (a fraction) below the FP32 ONNX model's before the
check retries with the next remedy and, failing all, says so in the log and the result."""

EXPORTED_VARIANT = "per-channel weights"
"""What the INT8 file export_model writes is (quantize_int8's defaults), as the report names it."""

_CHECKED_KEYS = frozenset(
    {"variant", "clean_accuracy", "fp32_clean_accuracy", "drop", "tried", "n_clean", "warning", "eval", "calibration"}
)
"""Keys of the INT8 record that the check writes (the others describe the file's quantization)."""


@dataclass
class Int8Search:
    """What a remedy may use: the FP32 model, the calibration images, a scorer on the
    validation data, the FP32 accuracy to stay within ``tolerance`` of, and what was tried."""

    fp32_path: Path
    calibration: Tensor
    val_loader: Iterable[Any]
    fp32_accuracy: float
    tolerance: float
    workdir: Path
    tried: list[dict[str, Any]] = field(default_factory=list)

    def score(self, onnx_path: Path) -> float:
        """Clean accuracy of an ONNX model on the validation data."""
        return evaluate_onnx(onnx_path, self.val_loader).clean_accuracy

    def quantize(self, candidate: Candidate, out_path: Path) -> dict[str, Any]:
        """Quantize the FP32 model as ``candidate`` says, into ``out_path``; quantize_int8's record."""
        info = quantize_int8(self.fp32_path, out_path, self.calibration, **candidate.options)
        info.pop("path", None)
        return info

    def note(self, variant: str, accuracy: float) -> None:
        self.tried.append({"variant": variant, "clean_accuracy": accuracy, "drop": self.fp32_accuracy - accuracy})
        log.info("INT8 (%s): clean accuracy %.4f, FP32 %.4f", variant, accuracy, self.fp32_accuracy)

    def within(self, accuracy: float) -> bool:
        return self.fp32_accuracy - accuracy <= self.tolerance


def check_int8(
    exported: ExportResult, fp32_eval: Mapping[str, Any] | None, val_loader: Iterable[Any] | None
) -> dict[str, Any]:
    """Score ``exported``'s INT8 model against the FP32 one (``fp32_eval``: its ONNX accuracy)
    and try the remedies while it loses more than INT8_MAX_DROP; returns the INT8 record (the
    chosen file's quantization, its accuracy, what was tried) and updates ``exported``'s
    size of the file when a remedy replaced it."""
    int8_path = exported.path("int8")
    written = exported.int8 or {}
    record = {k: v for k, v in written.items() if k not in _CHECKED_KEYS}  # the file's quantization
    variant = written.get("variant", EXPORTED_VARIANT)  # a checked export's file may be a remedy's
    source = written.get("calibration")
    if val_loader is None or fp32_eval is None:
        log.warning("INT8 model written without an accuracy check: pass validation data to measure it")
        return {
            **record,
            "variant": variant,
            "warning": "INT8 accuracy not measured (no validation data given)",
            "calibration": source,
        }
    if exported.calibration is None:
        raise ConfigError("check_int8: the export kept no calibration images to re-quantize with")
    fp32 = float(fp32_eval["clean_accuracy"])
    with tempfile.TemporaryDirectory(dir=int8_path.parent, prefix=".int8-") as tmp:
        search = Int8Search(exported.path("onnx"), exported.calibration, val_loader, fp32, INT8_MAX_DROP, Path(tmp))
        acc = search.score(int8_path)
        search.note(variant, acc)
        best: tuple[float, Path, dict[str, Any]] = (acc, int8_path, {**record, "variant": variant})
        for remedy in list_remedies() if not search.within(acc) else []:
            for candidate in remedy.candidates(search):
                path = search.workdir / f"int8-{len(search.tried)}.onnx"
                info = search.quantize(candidate, path)
                acc = search.score(path)
                search.note(candidate.variant, acc)
                if acc > best[0]:
                    best = (acc, path, {**info, "variant": candidate.variant})
            if search.within(best[0]):
                break
        acc, chosen, info = best
        if chosen != int8_path:
            os.replace(chosen, int8_path)
            exported.record("int8", exported.files["int8"])
    info.update(
        {
            "clean_accuracy": acc,
            "fp32_clean_accuracy": fp32,
            "drop": fp32 - acc,
            "tried": search.tried,
            "n_clean": fp32_eval.get("n_clean"),
        }
    )
    if not search.within(acc):
        info["warning"] = (
            f"INT8 loses {100 * (fp32 - acc):.1f} points of clean accuracy against FP32 "
            f"({100 * acc:.2f} vs {100 * fp32:.2f} %) after trying: "
            f"{'; '.join(t['variant'] for t in search.tried)}"
        )
        log.warning("%s; deploy the FP32 model or calibrate on more representative images", info["warning"])
    info["calibration"] = source
    return info
