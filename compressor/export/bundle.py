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
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..atomic import write_text
from ..errors import INPUTS_CHECKED, ConfigError, OutputError, WeightsError
from ..recipe import DataSection, recipe_from_dict
from ..runtime import count_macs, dumps, jsonable
from ..runtime.batches import first_images
from .latency import onnx_latencies
from .metadata import deployment_metadata, onnx_metadata
from .onnx_export import export_onnx, parity_check
from .quantize import quantize_int8
from .safetensors_io import CUSTOM_SOURCE, load_compressed, save_compressed

log = logging.getLogger(__name__)

SAFETENSORS_NAME, ONNX_NAME, INT8_NAME, SUMMARY_NAME = (
    "model.safetensors",
    "model.onnx",
    "model.int8.onnx",
    "export.json",
)
CALIBRATION_IMAGES = 256
"""Training images INT8 is calibrated on (a few hundred cover the activation ranges)."""
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
    deployment: dict[str, Any] | None = None
    """What a deployer needs (input, preprocessing, class names, compression); also in every artifact."""

    @property
    def ok(self) -> bool:
        """Parity passed and the graph keeps the factorized structure (True without ONNX)."""
        if self.parity is None:
            return True
        return bool(self.parity["passed"] and (self.structure or {}).get("matches", False))

    def to_dict(self) -> dict[str, Any]:
        out = {
            k: getattr(self, k)
            for k in (
                "files",
                "sizes",
                "onnx",
                "structure",
                "parity",
                "onnx_eval",
                "macs",
                "int8",
                "latency",
                "deployment",
            )
        }
        return jsonable({**{k: v for k, v in out.items() if v is not None}, "ok": self.ok})


def export_model(
    model: nn.Module,
    out_dir: str | Path,
    *,
    input_size: int,
    in_chans: int = 3,
    model_info: Mapping[str, Any] | None = None,
    class_names: Sequence[str] | None = None,
    preprocess: Mapping[str, Any] | None = None,
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

    Works for any module: ``model_info`` (:meth:`compressor.models.ModelInfo.to_dict`, for a
    model from ``create_model``) lets the safetensors file rebuild the model by name; without
    it :func:`~compressor.export.load_compressed` needs a skeleton. ``class_names`` (index
    order) and ``preprocess`` (how an image becomes an input; default: RGB, bilinear, [0, 1])
    go into every artifact's deployment metadata. ``calibration``: images (N, C, H, W in
    [0, 1]) for INT8, required with ``int8``; ``calibration_source`` says where they came from.
    ``dense_model``: timed beside the compressed one. ``val_loader``: the ONNX model and the
    INT8 one are scored on it, and INT8 that loses more than :data:`INT8_MAX_DROP` of clean
    accuracy is retried with the first and last layers in float; ``evaluation`` holds
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
    deployment = deployment_metadata(
        model,
        input_size=input_size,
        in_chans=in_chans,
        class_names=class_names,
        preprocess=preprocess,
        model_info=model_info,
    )
    result = ExportResult(deployment=deployment)
    if safetensors:
        save_compressed(model, out / SAFETENSORS_NAME, model_info=model_info, recipe=recipe, deployment=deployment)
        _record(result, out, "safetensors", SAFETENSORS_NAME)
    if not onnx:
        return result

    onnx_path = out / ONNX_NAME
    info = export_onnx(
        model, onnx_path, input_size=input_size, in_chans=in_chans, opset=opset, metadata=onnx_metadata(deployment)
    )
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
        result.int8 = _quantize(onnx_path, int8_path, calibration, val_loader, result.onnx_eval)
        result.int8["calibration"] = calibration_source
        _record(result, out, "int8", INT8_NAME)
        if val_loader is not None and evaluate_kwargs.get("attacks"):
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


INT8_MAX_DROP = 0.01
"""INT8 clean accuracy may fall this far (a fraction) below the FP32 ONNX model's before the
export retries with the next remedy and, failing all, says so in the log and the result."""

_INT8_ATTEMPTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("per-channel weights", {"per_channel": True}),
    ("per-channel weights, first and last layers in float", {"per_channel": True, "float_ends": True}),
)


def _quantize(
    onnx_path: Path,
    int8_path: Path,
    calibration: Tensor,
    val_loader: Iterable[Any] | None,
    fp32_eval: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """Static INT8, checked against the FP32 model's clean accuracy where there is validation
    data; the standard remedies are tried in turn until INT8 stays within INT8_MAX_DROP."""
    if val_loader is None or fp32_eval is None:
        info = quantize_int8(onnx_path, int8_path, calibration, **_INT8_ATTEMPTS[0][1])
        info["variant"] = _INT8_ATTEMPTS[0][0]
        info["warning"] = "INT8 accuracy not measured (no validation data given)"
        log.warning("INT8 model written without an accuracy check: pass validation data to measure it")
        info.pop("path", None)
        return info
    from ..evaluate import evaluate_onnx

    fp32 = float(fp32_eval["clean_accuracy"])
    tried: list[dict[str, Any]] = []
    best: tuple[float, Path, dict[str, Any]] | None = None
    with tempfile.TemporaryDirectory(dir=int8_path.parent, prefix=".int8-") as tmp:
        for k, (variant, options) in enumerate(_INT8_ATTEMPTS):
            candidate = Path(tmp) / f"int8-{k}.onnx"
            info = quantize_int8(onnx_path, candidate, calibration, **options)
            acc = evaluate_onnx(candidate, val_loader).clean_accuracy
            tried.append({"variant": variant, "clean_accuracy": acc, "drop": fp32 - acc})
            log.info("INT8 (%s): clean accuracy %.4f, FP32 %.4f", variant, acc, fp32)
            if best is None or acc > best[0]:
                best = (acc, candidate, {**info, "variant": variant})
            if fp32 - acc <= INT8_MAX_DROP:
                break
        acc, chosen, info = best
        os.replace(chosen, int8_path)
    info.pop("path", None)
    info.update(
        {
            "clean_accuracy": acc,
            "fp32_clean_accuracy": fp32,
            "drop": fp32 - acc,
            "tried": tried,
            "n_clean": fp32_eval.get("n_clean"),
        }
    )
    if fp32 - acc > INT8_MAX_DROP:
        info["warning"] = (
            f"INT8 loses {100 * (fp32 - acc):.1f} points of clean accuracy against FP32 "
            f"({100 * acc:.2f} vs {100 * fp32:.2f} %) after trying: "
            f"{'; '.join(t['variant'] for t in tried)}"
        )
        log.warning("%s; deploy the FP32 model or calibrate on more representative images", info["warning"])
    return info


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
    safetensors_path: str | Path,
    out_dir: str | Path,
    *,
    int8: bool = False,
    calibration: Tensor | None = None,
    data: DataSection | Mapping[str, Any] | None = None,
    random_calibration: bool = False,
    **kwargs: Any,
) -> ExportResult:
    """``compress export``: reload a file written by :func:`export_model`, export it again with
    :func:`export_model` (no safetensors rewrite) and write ``export.json``.

    Validation data (for the ONNX and INT8 accuracy) and INT8 calibration images come from
    the data section of the recipe the model was trained with (saved in its manifest), with
    the same seed: the run's own validation split and training images. ``data`` replaces that
    section (a DataSection) or changes some of its keys (a mapping such as ``{"root": ...}``;
    a new ``name`` drops the recipe's ``root``).
    ``calibration`` overrides the calibration images; ``random_calibration`` calibrates on
    uniform noise instead, only when asked (activation ranges from noise can cost accuracy). A
    failed parity check raises WeightsError after export.json is written.
    """
    src, out = Path(safetensors_path), Path(out_dir)
    model, manifest = load_compressed(src)  # checks the file first: a bad one leaves no output folder behind
    m = manifest["model"]
    size, chans = m.get("input_size"), m.get("in_chans")
    deployment = manifest.get("deployment") or {}
    if size is None or chans is None:  # a custom model's manifest: its deployment record has the input
        shape = (deployment.get("input") or {}).get("shape") or [None, None, None, None]
        chans, size = shape[1], shape[2]
    if not isinstance(size, int) or not isinstance(chans, int):
        raise WeightsError(f"{src}: its manifest does not say the model's input size; export it from Python")
    recipe = manifest.get("recipe") or {}
    bundle = None
    if isinstance(data, Mapping):
        base = dict(recipe.get("data") or {})
        if "name" in data and data["name"] != base.get("name"):
            base.pop("root", None)
        data = recipe_from_dict({"data": {**base, **data}}, source="compress export --data").data
    elif data is None and (int8 and calibration is None and not random_calibration) and recipe.get("data"):
        data = recipe_from_dict({"data": recipe["data"]}, source=f"{src} (its recipe)").data
    if int8 and calibration is None and data is None and not random_calibration:
        raise ConfigError(
            f"INT8 needs calibration images and {src} does not say what it was trained on: give --data/--data-root "
            "(the training data), --calibration FILE, or --calibration random"
        )
    if data is not None:
        from ..data import build_data

        bundle = build_data(data, input_size=size, seed=int(recipe.get("seed", 0)))
    log.info("loaded %s; exporting into %s", src, out, extra={INPUTS_CHECKED: True})
    source = kwargs.pop("calibration_source", "given images")
    if int8 and calibration is None:
        if random_calibration:
            log.warning(
                "INT8 calibration on %d random images, as asked: activation ranges from noise can cost accuracy",
                RANDOM_CALIBRATION_IMAGES,
            )
            calibration = torch.rand(
                RANDOM_CALIBRATION_IMAGES, chans, size, size, generator=torch.Generator().manual_seed(0)
            )
            source = f"{RANDOM_CALIBRATION_IMAGES} random images"
        else:
            from ..data import set_epoch

            set_epoch(bundle.train_loader, 0)  # epoch 0's first images, as the run took them
            calibration = first_images(bundle.train_loader, CALIBRATION_IMAGES)
            source = f"{len(calibration)} {bundle.name} training images"
    result = export_model(
        model,
        out,
        input_size=size,
        in_chans=chans,
        model_info=m if m.get("source") != CUSTOM_SOURCE else None,
        class_names=deployment.get("class_names") or (bundle.class_names if bundle is not None else None),
        preprocess=deployment.get("preprocess") or (bundle.preprocess if bundle is not None else None),
        safetensors=False,
        int8=int8,
        calibration=calibration,
        calibration_source=source,
        val_loader=bundle.val_loader if bundle is not None else None,
        **kwargs,
    )
    summary = {"source": str(src), "model": m, "params": manifest.get("params"), "layers": manifest["layers"]}
    if bundle is not None:
        summary["data"] = {"name": bundle.name, "n_val": bundle.n_val, "seed": int(recipe.get("seed", 0))}
    write_text(out / SUMMARY_NAME, dumps({**summary, **result.to_dict()}))
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
