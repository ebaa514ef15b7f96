"""INT8 accuracy against FP32, with remedies tried in turn until INT8 is close enough.

:func:`compressor.export.export_model` writes the INT8 model with
:func:`~compressor.export.quantize_int8`'s defaults (static QDQ, weights per channel, MinMax
calibration, the activation type this CPU fuses). Here it is scored on the validation data
beside the FP32 ONNX model; when it loses more than the export section's ``int8_max_drop`` of
clean accuracy, the registered remedies (:mod:`compressor.check.remedies`: calibration chosen
by validation, the first and last layers in float, the most sensitive layers in float) are
tried in turn, each re-quantizing the FP32 model; the best candidate replaces the file, and the
report lists every candidate tried, the accuracy of each calibration method and the layers
kept in float.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from ..errors import ConfigError
from ..evaluate import evaluate_onnx
from ..export import ExportResult, quantize_int8
from ..export.quantize import CALIBRATIONS, prepare_for_quantization
from ..recipe import ExportSection
from ..runtime import ort_session
from ..runtime.batches import first_images
from .remedies import Candidate, describe, list_remedies

log = logging.getLogger(__name__)

INT8_MAX_DROP = ExportSection().int8_max_drop
"""The recipe's default tolerance: INT8 clean accuracy may fall this far (a fraction) below the
FP32 ONNX model's before the check retries with the next remedy (``export.int8_max_drop``)."""

EXPORTED_VARIANT = describe({})
"""What the INT8 file export_model writes is (quantize_int8's defaults), as the report names it."""

_CHECKED_KEYS = frozenset(
    {
        "variant",
        "clean_accuracy",
        "fp32_clean_accuracy",
        "drop",
        "tried",
        "n_clean",
        "warning",
        "eval",
        "calibration",
        "calibration_methods",
        "sensitivity",
        "max_drop",
    }
)
"""Keys of the INT8 record that the check writes (the others describe the file's quantization)."""

_OPTION_KEYS = ("calibration", "percentile", "float_layers", "float_ends", "activation_type", "per_channel")


def options_of(record: Mapping[str, Any]) -> dict[str, Any]:
    """quantize_int8's options that made the file ``record`` describes (an older record's
    ``MinMax`` reads as ``minmax``)."""
    method = str(record.get("calibrate_method", "minmax")).lower()
    out: dict[str, Any] = {"calibration": method if method in CALIBRATIONS else "minmax"}
    if out["calibration"] == "percentile" and record.get("percentile") is not None:
        out["percentile"] = record["percentile"]
    if record.get("float_layers"):
        out["float_layers"] = tuple(record["float_layers"])
    if record.get("float_ends"):
        out["float_ends"] = True
    return out


@dataclass
class Int8Search:
    """What a remedy may use: the FP32 model (pre-processed once for quantization), the
    calibration images, a scorer on the validation data, the FP32 accuracy to stay within
    ``tolerance`` of, what was tried, and the options of the best candidate so far."""

    fp32_path: Path
    calibration: Tensor
    val_loader: Iterable[Any]
    fp32_accuracy: float
    tolerance: float
    workdir: Path
    activation_type: str = "auto"
    tried: list[dict[str, Any]] = field(default_factory=list)
    best_options: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    """What remedies measured on the way, for the report (e.g. ``sensitivity``)."""
    _source: Path | None = None
    _preprocessed: bool = False
    _val_images: np.ndarray | None = None

    def source(self) -> Path:
        """The FP32 model as every candidate quantizes it: pre-processed once per search."""
        if self._source is None:
            pre = self.workdir / "fp32.pre.onnx"
            self._preprocessed = prepare_for_quantization(self.fp32_path, pre)
            self._source = pre if self._preprocessed else self.fp32_path
        return self._source

    def score(self, onnx_path: Path) -> float:
        """Clean accuracy of an ONNX model on the validation data."""
        return evaluate_onnx(onnx_path, self.val_loader).clean_accuracy

    def quantize(self, candidate: Candidate, out_path: Path) -> dict[str, Any]:
        """Quantize the FP32 model as ``candidate`` says, into ``out_path``; quantize_int8's record.
        Ranges are calibrated once per method (a cache file in the work folder)."""
        opts = {"activation_type": self.activation_type, **candidate.options}
        method = opts.get("calibration", "minmax")
        tag = f"{method}-{opts['percentile']}" if method == "percentile" and "percentile" in opts else method
        info = quantize_int8(
            self.source(),
            out_path,
            self.calibration,
            preprocess=False,
            calibration_cache=self.workdir / f"ranges-{tag}.json",
            **opts,
        )
        info.pop("path", None)
        fp32 = self.fp32_path.stat().st_size
        info.update(preprocessed=self._preprocessed, fp32_size_bytes=fp32, size_ratio=fp32 / info["size_bytes"])
        return info

    def logits(self, model: Path | bytes, n_images: int) -> np.ndarray:
        """Logits of an ONNX model (a file, or serialized) on the first ``n_images`` validation
        images (a few batches, for measurements that compare many candidates)."""
        if self._val_images is None or len(self._val_images) < n_images:
            self._val_images = first_images(self.val_loader, n_images).float().cpu().numpy()
        session = ort_session(model) if isinstance(model, Path) else _session(model)
        name = session.get_inputs()[0].name
        x = self._val_images[:n_images]
        return np.concatenate([session.run(None, {name: x[i : i + 32]})[0] for i in range(0, len(x), 32)])

    def note(self, variant: str, accuracy: float, options: Mapping[str, Any] | None = None) -> None:
        opts = options_of({}) | dict(options or {})
        self.tried.append(
            {
                "variant": variant,
                "clean_accuracy": accuracy,
                "drop": self.fp32_accuracy - accuracy,
                "calibrate_method": opts["calibration"],
                "float_layers": list(opts.get("float_layers", ())),
                "float_ends": bool(opts.get("float_ends", False)),
            }
        )
        log.info("INT8 (%s): clean accuracy %.4f, FP32 %.4f", variant, accuracy, self.fp32_accuracy)

    def within(self, accuracy: float) -> bool:
        return self.fp32_accuracy - accuracy <= self.tolerance

    def calibration_options(self) -> dict[str, Any]:
        """The calibration of the best candidate so far (what later remedies build on)."""
        return {k: self.best_options[k] for k in ("calibration", "percentile") if k in self.best_options}


def _session(model: bytes):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def calibration_methods(tried: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Clean accuracy of each calibration method tried with every layer quantized."""
    out: dict[str, float] = {}
    for t in tried:
        if not t.get("float_layers") and not t.get("float_ends"):
            m = t["calibrate_method"]
            out[m] = max(out.get(m, 0.0), t["clean_accuracy"])
    return out


def check_int8(
    exported: ExportResult, fp32_eval: Mapping[str, Any] | None, val_loader: Iterable[Any] | None
) -> dict[str, Any]:
    """Score ``exported``'s INT8 model against the FP32 one (``fp32_eval``: its ONNX accuracy)
    and try the remedies while it loses more than the export section's ``int8_max_drop``;
    returns the INT8 record (the chosen file's quantization, its accuracy, what was tried) and
    updates ``exported``'s size of the file when a remedy replaced it."""
    int8_path = exported.path("int8")
    written = exported.int8 or {}
    record = {k: v for k, v in written.items() if k not in _CHECKED_KEYS}  # the file's quantization
    variant = written.get("variant", describe(options_of(record)))  # a checked export's file may be a remedy's
    source = written.get("calibration")
    section = exported.section or ExportSection()
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
        search = Int8Search(
            exported.path("onnx"),
            exported.calibration,
            val_loader,
            fp32,
            section.int8_max_drop,
            Path(tmp),
            activation_type=section.int8_activations,
        )
        search.best_options = options_of(record)
        acc = search.score(int8_path)
        search.note(variant, acc, search.best_options)
        best: tuple[float, Path, dict[str, Any]] = (acc, int8_path, {**record, "variant": variant})
        for remedy in list_remedies() if not search.within(acc) else []:
            for candidate in remedy.candidates(search):
                path = search.workdir / f"int8-{len(search.tried)}.onnx"
                info = search.quantize(candidate, path)
                acc = search.score(path)
                search.note(candidate.variant, acc, candidate.options)
                if acc > best[0]:  # ties keep the earlier, cheaper candidate
                    if best[1] != int8_path:
                        best[1].unlink()
                    best = (acc, path, {**info, "variant": candidate.variant})
                    search.best_options = dict(candidate.options)
                else:
                    path.unlink()
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
            "max_drop": search.tolerance,
            "tried": search.tried,
            "calibration_methods": calibration_methods(search.tried),
            "n_clean": fp32_eval.get("n_clean"),
            **search.notes,
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
