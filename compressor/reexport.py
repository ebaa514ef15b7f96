"""``compress export``: a saved model exported again and checked, on its run's own data.

:func:`export_saved` reloads a model.safetensors written by a run (or by
:func:`~compressor.export.export_model`), rebuilds the run's data from the recipe saved in its
manifest (its validation split to score the ONNX and INT8 models on, its training images to
calibrate INT8 with), exports (:func:`~compressor.export.export_model`), checks
(:func:`~compressor.check.check_export`) and writes ``export.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .atomic import write_text
from .check import calibration_images, check_export
from .errors import INPUTS_CHECKED, ConfigError, WeightsError
from .export import ONNX_NAME, SUMMARY_NAME, ExportResult, export_model
from .export.safetensors_io import CUSTOM_SOURCE
from .load import load_compressed
from .recipe import DataSection, EvaluateSection, ExportSection, recipe_from_dict
from .runtime import dumps
from .sections import resolve_section

log = logging.getLogger(__name__)

RANDOM_CALIBRATION_IMAGES = 256
"""Uniform-noise images INT8 is calibrated on with ``--calibration random``."""


def export_saved(
    safetensors_path: str | Path,
    out_dir: str | Path,
    section: ExportSection | None = None,
    *,
    calibration: Tensor | None = None,
    calibration_source: str = "given images",
    data: DataSection | Mapping[str, Any] | None = None,
    random_calibration: bool = False,
    **options: Any,
) -> ExportResult:
    """Export the model in ``safetensors_path`` again into ``out_dir`` (no safetensors rewrite),
    check it and write ``export.json``.

    ``section``: the export settings (default: the recipe's defaults); ``options`` are keyword
    shortcuts for its keys (``int8=True``, ``latency=False``, ``opset=17``). Validation data
    (for the ONNX and INT8 accuracy) and INT8 calibration images come from the data section of
    the recipe the model was trained with (saved in its manifest), with the same seed: the
    run's own validation split and training images. ``data`` replaces that section (a
    DataSection) or changes some of its keys (a mapping such as ``{"root": ...}``; a new
    ``name`` drops the recipe's ``root``). ``calibration`` overrides the calibration images;
    ``random_calibration`` calibrates on uniform noise instead, only when asked (activation
    ranges from noise can cost accuracy). A failed parity check raises WeightsError after
    export.json is written.
    """
    section = resolve_section(ExportSection, section, {**options, "safetensors": False}, source="export_saved")
    int8 = section.int8
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
        from .data import build_data

        bundle = build_data(data, input_size=size, seed=int(recipe.get("seed", 0)))
    log.info("loaded %s; exporting into %s", src, out, extra={INPUTS_CHECKED: True})
    source = calibration_source
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
            calibration = calibration_images(bundle.train_loader)  # epoch 0's first images, as the run took them
            source = f"{len(calibration)} {bundle.name} training images"
    exported = export_model(
        model,
        out,
        section,
        input_size=size,
        in_chans=chans,
        model_info=m if m.get("source") != CUSTOM_SOURCE else None,
        class_names=deployment.get("class_names") or (bundle.class_names if bundle is not None else None),
        preprocess=deployment.get("preprocess") or (bundle.preprocess if bundle is not None else None),
        calibration=calibration,
        calibration_source=source,
    )
    # the ONNX models' clean accuracy on the validation split (the run's attacks are its report's)
    result = check_export(
        model, exported, EvaluateSection(attacks=[]), val_loader=bundle.val_loader if bundle is not None else None
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
