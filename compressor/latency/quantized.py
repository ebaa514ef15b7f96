"""INT8 versions of the graphs a latency model times (``precision: int8``).

The same static QDQ quantization as the export's INT8 model (:mod:`compressor.export.quantize`:
int8 weights per output channel, activations per tensor in the type the export writes on this
machine (uint8 on x86-64, int8 elsewhere: the kernels differ), MinMax ranges), calibrated on
random inputs: the ranges change the values, not the kernels onnxruntime runs, so the time is
that of the exported INT8 graph.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

CALIBRATION_BATCHES = 2
"""Random input batches the ranges are computed on."""


def _quantize(src: Path, out: Path, input_shape: Sequence[int]) -> Path:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from ..export.quantize import native_activation_type
    from ..runtime import ort_session

    name = ort_session(src).get_inputs()[0].name
    rng = np.random.default_rng(0)
    shape = (min(int(input_shape[0]), 8), *[int(d) for d in input_shape[1:]])
    batches = [{name: rng.random(shape, dtype=np.float32)} for _ in range(CALIBRATION_BATCHES)]

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    quantize_static(
        str(src),
        str(out),
        _Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8 if native_activation_type() == "uint8" else QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    return out


def quantize_file(src: Path, out: Path, input_shape: Sequence[int]) -> Path:
    """Write the INT8 QDQ version of the ONNX file ``src`` to ``out``."""
    return _quantize(Path(src), Path(out), input_shape)


def quantize_graph(proto: Any, input_shape: Sequence[int]) -> Any:
    """The INT8 QDQ version of an in-memory ONNX ModelProto."""
    import onnx

    with tempfile.TemporaryDirectory(prefix="latency-int8-") as tmp:
        src = Path(tmp) / "fp32.onnx"
        src.write_bytes(proto.SerializeToString())
        return onnx.load(str(_quantize(src, Path(tmp) / "int8.onnx", input_shape)))


__all__ = ["CALIBRATION_BATCHES", "quantize_file", "quantize_graph"]
