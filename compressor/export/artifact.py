"""From a saved compressed model to deployable, checked artifacts (``compress export PATH``)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..atomic import write_text
from ..errors import INPUTS_CHECKED, OutputError, WeightsError
from .latency import count_macs, onnx_latencies
from .onnx_export import export_onnx, parity_check, structure_check
from .quantize import quantize_int8
from .safetensors_io import load_compressed

log = logging.getLogger(__name__)

RANDOM_CALIBRATION_IMAGES = 256


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    return str(obj)


def export_checkpoint(safetensors_path: str | Path, out_dir: str | Path, *, int8: bool = False,
                      calibration: Tensor | None = None, latency: bool = True, opset: int = 18, threads: int = 2,
                      strict: bool = True) -> dict[str, Any]:
    """Load a file written by save_compressed, export it to ONNX and check the export.

    Writes ``model.onnx`` (and ``model.int8.onnx`` with ``int8``) and ``export.json`` into
    ``out_dir``, atomically; returns what export.json holds: the ONNX export info, structure
    and parity checks, MACs (compressed and dense-equivalent), onnxruntime latency at batch 1
    and 32 with ``threads`` threads, INT8 size. INT8 calibrates on ``calibration`` images
    (N, C, H, W in [0, 1]); without them on uniform random images (logged: ranges from noise
    cost accuracy, give real images when you have them). With ``strict`` a failed parity
    check raises WeightsError after export.json is written.
    """
    src = Path(safetensors_path)
    out = Path(out_dir)
    model, manifest = load_compressed(src)  # checks the file first: a bad one leaves no output folder behind
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create output folder {out}: {err.strerror}") from None
    log.info("loaded %s; exporting into %s", src, out, extra={INPUTS_CHECKED: True})
    m = manifest["model"]
    size, chans = m["input_size"], m["in_chans"]
    onnx_path = out / "model.onnx"
    info = export_onnx(model, onnx_path, input_size=size, in_chans=chans, opset=opset)
    structure = structure_check(onnx_path, model)
    parity = parity_check(onnx_path, model, input_size=size, batches=(1, 8))
    macs_c = count_macs(model, size, in_chans=chans)
    macs_d = count_macs(model, size, in_chans=chans, dense_equivalent=True)
    result: dict[str, Any] = {
        "source": str(src),
        "model": m,
        "params": manifest.get("params"),
        "layers": manifest["layers"],
        "onnx": info.to_dict(),
        "structure": structure,
        "parity": parity,
        "macs": {"compressed": macs_c, "dense": macs_d, "ratio": macs_d / macs_c if macs_c else None},
    }
    int8_path = out / "model.int8.onnx"
    if int8:
        if calibration is None:
            log.warning("INT8 calibration on %d random images: activation ranges from noise can cost accuracy; "
                        "pass real training images for calibration", RANDOM_CALIBRATION_IMAGES)
            calib = torch.rand(RANDOM_CALIBRATION_IMAGES, chans, size, size, generator=torch.Generator().manual_seed(0))
            source = "random uniform images"
        else:
            calib, source = calibration, "given images"
        result["int8"] = quantize_int8(onnx_path, int8_path, calib)
        result["int8"]["calibration"] = source
    if latency:
        paths = {"fp32": onnx_path, **({"int8": int8_path} if int8 else {})}  # timed side by side
        lat: dict[str, Any] = {"threads": threads,
                               **onnx_latencies(paths, threads=threads, input_size=size, in_chans=chans)}
        result["latency"] = lat
    result["ok"] = bool(parity["passed"] and structure["matches"])
    write_text(out / "export.json", json.dumps(_jsonable(result), indent=2, allow_nan=False) + "\n")
    if not structure["matches"]:
        log.warning("the ONNX graph does not show the factorized structure (see structure in %s)", out / "export.json")
    if strict and not parity["passed"]:
        raise WeightsError(f"ONNX parity check failed for {onnx_path}: max |ONNX − PyTorch| = {parity['max_abs_diff']:.3g}, "
                           f"{parity['rel_diff']:.3g} of max |logit| (limit {parity['tolerance']:g}); "
                           f"details in {out / 'export.json'}")
    return result
