"""Static INT8 quantization (QDQ) of an exported ONNX model with onnxruntime.quantization.

Weights are quantized per output channel (int8, symmetric), activations per tensor with ranges
calibrated on training images: MinMax by default, or the percentile or entropy (KL) calibrators
of onnxruntime (Migacz, "8-bit Inference with TensorRT", GTC 2017; Wu et al., "Integer
Quantization for Deep Learning Inference", 2020, §4). Activations are unsigned on x86-64 and
signed elsewhere (:func:`native_activation_type`): onnxruntime's x86 kernels multiply uint8
activations by int8 weights, and with signed activations it leaves some QDQ convolutions
unfused, on a float path slower than the FP32 model.

The low-rank graph quantizes like any other: each factor is its own Conv/MatMul weight with its
own scales. :func:`quantizable_units` groups the nodes of one factorized layer (the two or three
convolutions of a Tucker layer, the two matrices of a low-rank linear) into one unit, which
``float_layers`` keeps in float as a whole, its internal activations included. Accuracy is
measured by the check stage (``compressor.check``), which also re-quantizes with the remedies;
this module only makes the file.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import platform
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from ..errors import ConfigError, OutputError, WeightsError
from ..runtime import ort_session
from .forms import PLAN_KEY

log = logging.getLogger(__name__)

CALIBRATIONS = ("minmax", "percentile", "entropy")
"""Activation-range calibrators of onnxruntime, cheapest first."""

PERCENTILE = 99.999
"""Percentile calibration keeps this share (%) of each activation's calibration values
(onnxruntime's default): a few extreme values per tensor no longer set its range."""

ENTROPY_BINS = 512
"""Histogram bins of the entropy calibrator, of which 128 quantized bins are compared by KL
divergence. onnxruntime's default through ``quantize_static`` is 128 and 128, which leaves a
single candidate threshold, the whole range: entropy calibration would be MinMax's."""

ACTIVATION_TYPES = ("auto", "uint8", "int8")

COMPUTE_OPS = ("Conv", "MatMul", "Gemm")


def native_activation_type() -> str:
    """The activation type onnxruntime's CPU kernels fuse on this machine: uint8 on x86-64
    (u8·s8 products, VNNI), int8 elsewhere (ARM's s8·s8 kernels; onnxruntime's guidance in
    ``quantize_static``'s documentation)."""
    return "uint8" if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86") else "int8"


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


def prepare_for_quantization(onnx_path: str | Path, out_path: str | Path) -> bool:
    """onnxruntime's ``quant_pre_process`` (shape inference + graph optimization) of
    ``onnx_path`` into ``out_path``; False (nothing written) when it fails on this graph."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(onnx_path), str(out_path))
        return True
    except Exception as err:  # symbolic shape inference fails on some graphs: quantize as is
        text = str(err).strip()
        log.warning(
            "quant_pre_process failed (%s: %s); quantizing the model as exported",
            type(err).__name__,
            text.splitlines()[0][:200] if text else "",
        )
        return False


def quantizable_units(onnx_path: str | Path) -> dict[str, list[str]]:
    """Unit name → names of its Conv/MatMul/Gemm nodes, in graph order.

    The factors of one factorized layer form one unit named as the layer (the export plan in
    the model's metadata names the layers; a factor's weight is named ``<layer>.<k>.weight``).
    Any other compute node is a unit of its own, named by its weight's module (the weight
    initializer's name without ``.weight``) or, when its weight is computed, by the node.
    Nodes without a name cannot be excluded from quantization and are left out.
    """
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    layers = sorted(json.loads(meta.get(PLAN_KEY, "{}")), key=len, reverse=True)  # the longest name first
    inits = {i.name for i in model.graph.initializer}
    units: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type not in COMPUTE_OPS or not node.name:
            continue
        weight = next((i for i in node.input[1:] if i in inits), None) or next(
            (i for i in node.input if i in inits), None
        )
        module = weight.rsplit(".", 1)[0] if weight and "." in weight else None
        unit = next((la for la in layers if module and (module == la or module.startswith(la + "."))), None)
        units.setdefault(unit or module or node.name, []).append(node.name)
    return units


def _calibrate_entropy(model_in: Path, reader: Any, cache: Path, workdir: Path) -> None:
    """Entropy-calibrated ranges of ``model_in`` into the cache file ``quantize_static`` reads,
    with :data:`ENTROPY_BINS` histogram bins (``quantize_static`` cannot pass bins on)."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    calibrator = create_calibrator(
        model_in,
        sorted(set(QLinearOpsRegistry) | set(QDQRegistry)),  # what quantize_static calibrates
        augmented_model_path=str(workdir / "augmented.onnx"),
        calibrate_method=CalibrationMethod.Entropy,
        extra_options={"num_bins": ENTROPY_BINS, "num_quantized_bins": 128},
    )
    calibrator.collect_data(reader)
    save_tensors_data(calibrator.compute_data(), cache)


def _float_nodes(model_in: Path, float_layers: Sequence[str], float_ends: bool) -> list[str]:
    """Node names kept in float: those of ``float_layers`` (unit or node names) and the ends."""
    nodes: list[str] = []
    if float_layers:
        units = quantizable_units(model_in)
        known = {n for ns in units.values() for n in ns}
        for name in float_layers:
            if name in units:
                nodes += units[name]
            elif name in known:
                nodes.append(name)
            else:
                raise ConfigError(
                    f"float_layers: {name!r} is no quantizable layer of the model; "
                    f"its layers: {', '.join(list(units)[:20])}{' ...' if len(units) > 20 else ''}"
                )
    if float_ends:
        nodes += _end_nodes(model_in)
    return list(dict.fromkeys(nodes))


def quantize_int8(
    onnx_path: str | Path,
    out_path: str | Path,
    calibration_images: Tensor,
    *,
    batch_size: int = 32,
    per_channel: bool = True,
    preprocess: bool = True,
    float_ends: bool = False,
    calibration: str = "minmax",
    percentile: float = PERCENTILE,
    float_layers: Sequence[str] = (),
    activation_type: str = "auto",
    calibration_cache: str | Path | None = None,
) -> dict[str, Any]:
    """Write a static QDQ INT8 version of ``onnx_path`` to ``out_path`` (atomically).

    ``calibration_images``: (N, C, H, W) in [0, 1], the model's input space (a few hundred
    training images are plenty). The model is first run through onnxruntime's
    ``quant_pre_process`` (shape inference + graph optimization) when that succeeds.
    ``calibration``: how activation ranges are set (:data:`CALIBRATIONS`; ``percentile``: the
    share kept, in %). ``float_layers``: units of :func:`quantizable_units` (or node names)
    kept in float; ``float_ends``: also the first and the last Conv/MatMul/Gemm (the layers
    whose quantization error reaches the input features and the logits most directly).
    ``activation_type``: uint8, int8 or auto (:func:`native_activation_type`).
    ``calibration_cache``: a JSON file of calibrated ranges (onnxruntime's
    ``calibration_cache_path``), read when it exists and written otherwise, so that
    re-quantizing the same graph with other layers in float calibrates once.
    Returns {path, size_bytes, fp32_size_bytes, size_ratio, calibrate_method, float_layers,
    float_nodes, activation_type, preprocessed, ...}.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    src, out = Path(onnx_path), Path(out_path)
    if not src.is_file():
        raise WeightsError(f"ONNX file not found: {src}")
    if not isinstance(calibration_images, Tensor) or calibration_images.dim() != 4 or len(calibration_images) == 0:
        raise ConfigError("calibration_images must be a non-empty (N, C, H, W) tensor of images in [0, 1]")
    if calibration not in CALIBRATIONS:
        raise ConfigError(f"calibration must be one of {', '.join(CALIBRATIONS)}, got {calibration!r}")
    if not 50.0 < percentile <= 100.0:
        raise ConfigError(f"percentile must be in (50, 100], got {percentile}")
    if activation_type not in ACTIVATION_TYPES:
        raise ConfigError(f"activation_type must be one of {', '.join(ACTIVATION_TYPES)}, got {activation_type!r}")
    activations = native_activation_type() if activation_type == "auto" else activation_type
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

    method = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }[calibration]
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".quant-") as tmp:
        model_in, preprocessed = src, False
        if preprocess:
            pre = Path(tmp) / "pre.onnx"
            if prepare_for_quantization(src, pre):
                model_in, preprocessed = pre, True
        tmp_out = Path(tmp) / "int8.onnx"
        excluded = _float_nodes(model_in, float_layers, float_ends)
        reader = _reader(inp.name, images, bs)
        cache = Path(calibration_cache) if calibration_cache is not None else None
        # the histogram calibrators print their progress: kept out of the caller's stdout
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                if calibration == "entropy" and (cache is None or not cache.is_file()):
                    cache = cache or Path(tmp) / "ranges.json"
                    _calibrate_entropy(model_in, reader, cache, Path(tmp))
                    reader.rewind()
                quantize_static(
                    str(model_in),
                    str(tmp_out),
                    reader,
                    quant_format=QuantFormat.QDQ,
                    per_channel=per_channel,
                    activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=method,
                    nodes_to_exclude=excluded,
                    extra_options={"CalibPercentile": percentile} if calibration == "percentile" else {},
                    calibration_cache_path=cache,
                )
        except Exception as err:
            raise OutputError(f"INT8 quantization of {src} failed: {type(err).__name__}: {str(err)[:300]}") from None
        finally:
            if printed.getvalue().strip():
                log.debug("onnxruntime calibration: %s", " | ".join(printed.getvalue().split("\n"))[:500])
        os.replace(tmp_out, out)  # same folder as out: atomic
    size, fp32 = out.stat().st_size, src.stat().st_size
    info = {
        "path": str(out),
        "size_bytes": size,
        "fp32_size_bytes": fp32,
        "size_ratio": fp32 / size if size else None,
        "format": "QDQ",
        "activation_type": activations,
        "weight_type": "int8",
        "per_channel": per_channel,
        "float_layers": list(float_layers),
        "float_ends": float_ends,
        "float_nodes": excluded,
        "calibrate_method": calibration,
        "calibration_images": int(len(images)),
        "preprocessed": preprocessed,
    }
    if calibration == "percentile":
        info["percentile"] = percentile
    log.info("INT8 model %s: %.2f MB (fp32 %.2f MB)", out, size / 1e6, fp32 / 1e6)
    return info


def _end_nodes(path: Path) -> list[str]:
    """Names of the first and the last Conv/MatMul/Gemm node (graph order is topological)."""
    import onnx

    compute = [n for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type in COMPUTE_OPS]
    names = [n.name for n in (compute[:1] + compute[-1:]) if n.name]
    return list(dict.fromkeys(names))
