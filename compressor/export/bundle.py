"""The one export path: a compressed model → checked, deployable files in one folder.

:func:`export_model` is what the pipeline, ``compress export`` and Python users call:

    safetensors (exact-size factors + manifest) → ONNX (factorized structure, checked once while
    exporting) → parity with PyTorch → ONNX accuracy on validation data (optional) → multiply-adds
    → INT8 (optional, calibrated on real images) → onnxruntime latency, timed side by side with
    the dense model and the INT8 model where there are any.

It returns one :class:`ExportResult`; file names in it are relative to the output folder, so a
result describes the folder wherever it is moved (the pipeline exports into a staging folder
that is renamed into place).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..atomic import write_text
from ..errors import INPUTS_CHECKED, ConfigError, OutputError, WeightsError
from ..runtime import count_macs, dumps, jsonable
from .latency import onnx_latencies
from .onnx_export import export_onnx, parity_check
from .quantize import quantize_int8
from .safetensors_io import load_compressed, save_compressed

log = logging.getLogger(__name__)

SAFETENSORS_NAME, ONNX_NAME, INT8_NAME, SUMMARY_NAME = (
    "model.safetensors",
    "model.onnx",
    "model.int8.onnx",
    "export.json",
)
RANDOM_CALIBRATION_IMAGES = 256


@dataclass
class ExportResult:
    """What :func:`export_model` wrote into its folder and what it checked."""

    files: dict[str, str] = field(default_factory=dict)
    """Artifact kind (safetensors, onnx, int8) → file name in the output folder."""
    sizes: dict[str, int] = field(default_factory=dict)
    """Artifact kind → bytes."""
    onnx: dict[str, Any] | None = None
    """How the ONNX file was made (exporter, opset, input shape, export plan)."""
    structure: dict[str, Any] | None = None
    """Does the graph keep the factorization (node counts, weight bytes vs expected)?"""
    parity: dict[str, Any] | None = None
    """max |ONNX − PyTorch| logits on random images, per batch size."""
    onnx_eval: dict[str, Any] | None = None
    """The ONNX model's accuracy on the validation data (and the PyTorch model's adversarial images)."""
    macs: dict[str, Any] | None = None
    """Multiply-adds per image: compressed, dense (the layers the factors replace counted dense), ratio."""
    int8: dict[str, Any] | None = None
    """The INT8 model: size, calibration source, accuracy."""
    latency: dict[str, Any] | None = None
    """onnxruntime median ms per batch size for each model timed (interleaved), and the speedups."""

    @property
    def ok(self) -> bool:
        """Parity passed and the graph keeps the factorized structure (True without ONNX)."""
        if self.parity is None:
            return True
        return bool(self.parity["passed"] and (self.structure or {}).get("matches", False))

    def to_dict(self) -> dict[str, Any]:
        out = {
            k: getattr(self, k)
            for k in ("files", "sizes", "onnx", "structure", "parity", "onnx_eval", "macs", "int8", "latency")
        }
        return jsonable({**{k: v for k, v in out.items() if v is not None}, "ok": self.ok})


def export_model(
    model: nn.Module,
    out_dir: str | Path,
    *,
    input_size: int,
    in_chans: int = 3,
    model_info: Mapping[str, Any] | None = None,
    recipe: Mapping[str, Any] | None = None,
    safetensors: bool = True,
    onnx: bool = True,
    opset: int = 18,
    int8: bool = False,
    calibration: Tensor | None = None,
    calibration_source: str = "given images",
    latency: bool = True,
    dense_model: nn.Module | None = None,
    threads: int = 2,
    repeats: int = 30,
    val_loader: Iterable[Any] | None = None,
    evaluation: Mapping[str, Any] | None = None,
    adversarial: Mapping[tuple[str, float], Tensor] | None = None,
) -> ExportResult:
    """Export ``model`` (images in [0, 1] → logits) into ``out_dir``; see the module docstring.

    ``model_info`` / ``recipe``: what the safetensors manifest records (``model_info`` is
    :meth:`compressor.models.ModelInfo.to_dict`; needed for ``safetensors``). ``calibration``:
    images (N, C, H, W in [0, 1]) for INT8, required with ``int8``; ``calibration_source``
    says where they came from. ``dense_model``: timed beside the compressed one.
    ``val_loader``: the ONNX model (and the INT8 one) are scored on it; ``evaluation`` holds
    :func:`compressor.evaluate.evaluate_onnx`'s keyword arguments (attacks, eps_unit, ...),
    ``adversarial`` the compressed model's adversarial images to score instead of recrafting.
    """
    out = Path(out_dir)
    if int8 and (not isinstance(calibration, Tensor) or calibration.dim() != 4 or not len(calibration)):
        raise ConfigError("INT8 export needs calibration images: an (N, C, H, W) tensor in [0, 1] of real inputs")
    if int8 and not onnx:
        raise ConfigError("INT8 export quantizes the ONNX model: enable onnx too")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create output folder {out}: {err.strerror}") from None
    model = model.cpu().eval()
    result = ExportResult()
    if safetensors:
        if model_info is None:
            raise ConfigError("safetensors export needs model_info (what the manifest records about the model)")
        save_compressed(model, out / SAFETENSORS_NAME, model_info=model_info, recipe=recipe)
        _record(result, out, "safetensors", SAFETENSORS_NAME)
    if not onnx:
        return result

    onnx_path = out / ONNX_NAME
    info = export_onnx(model, onnx_path, input_size=input_size, in_chans=in_chans, opset=opset)
    _record(result, out, "onnx", ONNX_NAME)
    result.onnx = {k: v for k, v in info.to_dict().items() if k not in ("path", "structure")}
    result.structure = info.structure  # computed once, by the export itself
    result.parity = parity_check(onnx_path, model, input_size=input_size, batches=(1, 8))
    evaluate_kwargs = dict(evaluation or {})
    if val_loader is not None:
        from ..evaluate import evaluate_onnx

        result.onnx_eval = evaluate_onnx(
            onnx_path, val_loader, torch_model=model, adversarial=adversarial or None, **evaluate_kwargs
        ).to_dict()
    macs_c = count_macs(model, input_size, in_chans=in_chans)
    macs_d = count_macs(model, input_size, in_chans=in_chans, dense_equivalent=True)
    result.macs = {"compressed": macs_c, "dense": macs_d, "ratio": macs_d / macs_c if macs_c else None}

    int8_path = out / INT8_NAME
    if int8:
        result.int8 = quantize_int8(onnx_path, int8_path, calibration)
        result.int8["calibration"] = calibration_source
        result.int8.pop("path", None)
        _record(result, out, "int8", INT8_NAME)
        if val_loader is not None:
            from ..evaluate import evaluate_onnx

            result.int8["eval"] = evaluate_onnx(
                int8_path, val_loader, torch_model=model, adversarial=adversarial or None, **evaluate_kwargs
            ).to_dict()
    if latency:
        result.latency = _latency(
            onnx_path,
            int8_path if int8 else None,
            dense_model,
            input_size=input_size,
            in_chans=in_chans,
            opset=opset,
            threads=threads,
            repeats=repeats,
        )
    return result


def _record(result: ExportResult, folder: Path, kind: str, name: str) -> None:
    result.files[kind] = name
    result.sizes[kind] = (folder / name).stat().st_size


def _latency(
    onnx_path: Path,
    int8_path: Path | None,
    dense_model: nn.Module | None,
    *,
    input_size: int,
    in_chans: int,
    opset: int,
    threads: int,
    repeats: int,
) -> dict[str, Any]:
    """Median latencies of the compressed model, the INT8 one and the dense one, interleaved, so
    that each speedup compares models under the same machine load."""
    timing = dict(batch_sizes=(1, 32), threads=threads, repeats=repeats, input_size=input_size, in_chans=in_chans)
    paths: dict[str, Path] = {"compressed": onnx_path}
    if int8_path is not None:
        paths["int8"] = int8_path
    with tempfile.TemporaryDirectory() as tmp:
        if dense_model is not None:
            # a throwaway reference, only timed: no onnx.checker pass (onnxruntime validates
            # the graph as it loads it)
            paths["dense"] = Path(tmp) / "dense.onnx"
            export_onnx(
                dense_model.cpu().eval(),
                paths["dense"],
                input_size=input_size,
                in_chans=in_chans,
                opset=opset,
                check=False,
            )
        out: dict[str, Any] = onnx_latencies(paths, **timing)
    base = out["compressed"]
    out["speedup"] = {
        other: {b: out[other][b]["median_ms"] / base[b]["median_ms"] for b in base}
        for other in ("dense",)
        if other in out
    }
    if "int8" in out:  # how much faster the INT8 model is than the FP32 compressed one
        out["speedup"]["int8_vs_compressed"] = {b: base[b]["median_ms"] / out["int8"][b]["median_ms"] for b in base}
    out["threads"] = threads
    return out


def export_saved(
    safetensors_path: str | Path, out_dir: str | Path, *, random_calibration: bool = False, **kwargs: Any
) -> ExportResult:
    """``compress export``: reload a file written by :func:`export_model` (or save_compressed),
    export it with :func:`export_model` (no safetensors rewrite) and write ``export.json``.

    ``random_calibration``: calibrate INT8 on uniform random images when no ``calibration``
    is given (only when asked: activation ranges from noise can cost accuracy). A failed
    parity check raises WeightsError after export.json is written.
    """
    src, out = Path(safetensors_path), Path(out_dir)
    model, manifest = load_compressed(src)  # checks the file first: a bad one leaves no output folder behind
    log.info("loaded %s; exporting into %s", src, out, extra={INPUTS_CHECKED: True})
    m = manifest["model"]
    if kwargs.get("int8") and kwargs.get("calibration") is None and random_calibration:
        log.warning(
            "INT8 calibration on %d random images: activation ranges from noise can cost accuracy; "
            "pass real training images for calibration",
            RANDOM_CALIBRATION_IMAGES,
        )
        kwargs["calibration"] = torch.rand(
            RANDOM_CALIBRATION_IMAGES,
            m["in_chans"],
            m["input_size"],
            m["input_size"],
            generator=torch.Generator().manual_seed(0),
        )
        kwargs["calibration_source"] = f"{RANDOM_CALIBRATION_IMAGES} random images"
    result = export_model(model, out, input_size=m["input_size"], in_chans=m["in_chans"], safetensors=False, **kwargs)
    write_text(
        out / SUMMARY_NAME,
        dumps(
            {
                "source": str(src),
                "model": m,
                "params": manifest.get("params"),
                "layers": manifest["layers"],
                **result.to_dict(),
            }
        ),
    )
    if result.structure is not None and not result.structure["matches"]:
        log.warning("the ONNX graph does not show the factorized structure (see structure in %s)", out / SUMMARY_NAME)
    if result.parity is not None and not result.parity["passed"]:
        p = result.parity
        raise WeightsError(
            f"ONNX parity check failed for {out / ONNX_NAME}: max |ONNX − PyTorch| = "
            f"{p['max_abs_diff']:.3g}, {p['rel_diff']:.3g} of max |logit| (limit {p['tolerance']:g}); "
            f"details in {out / SUMMARY_NAME}"
        )
    return result
