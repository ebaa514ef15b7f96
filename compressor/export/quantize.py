"""Static INT8 quantization (QDQ) of an exported ONNX model with onnxruntime.quantization.

Weights are quantized per output channel (int8, symmetric), activations per tensor (int8)
with ranges calibrated (MinMax) on training images. The low-rank graph quantizes like any
other: each factor is its own Conv/MatMul weight with its own scales. Accuracy is measured
by the check stage (``compressor.check``), which also re-quantizes with the remedies; this
module only makes the file.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from ..errors import ConfigError, OutputError, WeightsError
from ..runtime import ort_session

log = logging.getLogger(__name__)


def _reader(name: str, images: np.ndarray, batch_size: int):
    from onnxruntime.quantization import CalibrationDataReader

    class _Batches(CalibrationDataReader):
        """Feeds the calibration images to the calibrator in batches."""

        def __init__(self) -> None:
            self._it: Iterator[dict[str, np.ndarray]] = self._batches()

        def _batches(self) -> Iterator[dict[str, np.ndarray]]:
            for i in range(0, len(images), batch_size):
                yield {name: images[i : i + batch_size]}

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

        def rewind(self) -> None:
            self._it = self._batches()

    return _Batches()


def quantize_int8(
    onnx_path: str | Path,
    out_path: str | Path,
    calibration_images: Tensor,
    *,
    batch_size: int = 32,
    per_channel: bool = True,
    preprocess: bool = True,
    float_ends: bool = False,
) -> dict[str, Any]:
    """Write a static QDQ INT8 version of ``onnx_path`` to ``out_path`` (atomically).

    ``calibration_images``: (N, C, H, W) in [0, 1], the model's input space (a few hundred
    training images are plenty). The model is first run through onnxruntime's
    ``quant_pre_process`` (shape inference + graph optimization) when that succeeds.
    ``float_ends``: keep the first and the last Conv/MatMul/Gemm in float (the layers whose
    quantization error reaches the logits most directly; a standard remedy when INT8 costs
    accuracy). Returns {path, size_bytes, fp32_size_bytes, size_ratio, preprocessed, ...}.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, out = Path(onnx_path), Path(out_path)
    if not src.is_file():
        raise WeightsError(f"ONNX file not found: {src}")
    if not isinstance(calibration_images, Tensor) or calibration_images.dim() != 4 or len(calibration_images) == 0:
        raise ConfigError("calibration_images must be a non-empty (N, C, H, W) tensor of images in [0, 1]")
    sess = ort_session(src)
    inp = sess.get_inputs()[0]
    want = [d if isinstance(d, int) else None for d in inp.shape[1:]]
    got = list(calibration_images.shape[1:])
    if any(w is not None and w != g for w, g in zip(want, got)):
        raise ConfigError(f"calibration images are {got} (C, H, W) but the model takes {want}")
    fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
    images = calibration_images.detach().float().cpu().numpy()
    bs = fixed_batch or batch_size
    if fixed_batch:  # a fixed-batch export: drop the ragged tail
        images = images[: len(images) // bs * bs]
        if not len(images):
            raise ConfigError(f"the model has a fixed batch of {bs}: give at least {bs} calibration images")
    del sess

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".quant-") as tmp:
        model_in, preprocessed = src, False
        if preprocess:
            pre = Path(tmp) / "pre.onnx"
            try:
                quant_pre_process(str(src), str(pre))
                model_in, preprocessed = pre, True
            except Exception as err:  # symbolic shape inference fails on some graphs: quantize as is
                log.warning(
                    "quant_pre_process failed (%s: %s); quantizing the model as exported",
                    type(err).__name__,
                    str(err).strip().splitlines()[0][:200] if str(err).strip() else "",
                )
        tmp_out = Path(tmp) / "int8.onnx"
        excluded = _end_nodes(model_in) if float_ends else []
        try:
            quantize_static(
                str(model_in),
                str(tmp_out),
                _reader(inp.name, images, bs),
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=excluded,
            )
        except Exception as err:
            raise OutputError(f"INT8 quantization of {src} failed: {type(err).__name__}: {str(err)[:300]}") from None
        os.replace(tmp_out, out)  # same folder as out: atomic
    size, fp32 = out.stat().st_size, src.stat().st_size
    info = {
        "path": str(out),
        "size_bytes": size,
        "fp32_size_bytes": fp32,
        "size_ratio": fp32 / size if size else None,
        "format": "QDQ",
        "activation_type": "int8",
        "weight_type": "int8",
        "per_channel": per_channel,
        "float_nodes": excluded,
        "calibrate_method": "MinMax",
        "calibration_images": int(len(images)),
        "preprocessed": preprocessed,
    }
    log.info("INT8 model %s: %.2f MB (fp32 %.2f MB)", out, size / 1e6, fp32 / 1e6)
    return info


def _end_nodes(path: Path) -> list[str]:
    """Names of the first and the last Conv/MatMul/Gemm node (graph order is topological)."""
    import onnx

    compute = [
        n for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type in ("Conv", "MatMul", "Gemm")
    ]
    names = [n.name for n in (compute[:1] + compute[-1:]) if n.name]
    return list(dict.fromkeys(names))
