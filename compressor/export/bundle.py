"""The one export path: a compressed model → deployable files in one folder.

:func:`export_model` is what the pipeline, ``compress export`` and Python users call:

    safetensors (exact-size factors + manifest) → ONNX (factorized structure, checked once while
    exporting) → multiply-adds → INT8 QDQ ONNX (optional, calibrated on the images given)

It writes artifacts only. What the files are worth (parity with PyTorch, accuracy, INT8 against
FP32 with its remedies, latency) is measured afterwards by :mod:`compressor.check`, which fills
in the rest of the same :class:`ExportResult`. File names in it are relative to the output
folder, so a result describes the folder wherever it is moved (the pipeline exports into a
staging folder that is renamed into place).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..errors import ConfigError, OutputError
from ..recipe import ExportSection
from ..runtime import count_macs, jsonable
from ..sections import resolve_section
from .metadata import deployment_metadata, onnx_metadata
from .onnx_export import export_onnx
from .quantize import quantize_int8
from .safetensors_io import save_compressed

log = logging.getLogger(__name__)

SAFETENSORS_NAME, ONNX_NAME, INT8_NAME, SUMMARY_NAME = (
    "model.safetensors",
    "model.onnx",
    "model.int8.onnx",
    "export.json",
)

_KEYS = ("files", "sizes", "onnx", "structure", "parity", "onnx_eval", "macs", "int8", "latency", "deployment")


@dataclass
class ExportResult:
    """An export folder: what :func:`export_model` wrote and, once :func:`compressor.check.check_export`
    has run, what the checks found (``parity``, ``onnx_eval``, INT8 accuracy, ``latency``)."""

    files: dict[str, str] = field(default_factory=dict)
    """Artifact kind (safetensors, onnx, int8) → file name in the output folder."""
    sizes: dict[str, int] = field(default_factory=dict)
    """Artifact kind → bytes."""
    onnx: dict[str, Any] | None = None
    """How the ONNX file was made (exporter, opset, input shape, export plan)."""
    structure: dict[str, Any] | None = None
    """Does the graph keep the factorization (node counts, weight bytes vs expected)?"""
    parity: dict[str, Any] | None = None
    """Check: max |ONNX − PyTorch| logits on random images, per batch size."""
    onnx_eval: dict[str, Any] | None = None
    """Check: the ONNX model's accuracy on the validation data (and the PyTorch model's adversarial images)."""
    macs: dict[str, Any] | None = None
    """Multiply-adds per image: compressed, dense (the layers the factors replace counted dense), ratio."""
    int8: dict[str, Any] | None = None
    """The INT8 model: size, calibration source; once checked, its accuracy and the remedies tried."""
    latency: dict[str, Any] | None = None
    """Check: onnxruntime median ms per batch size for each model timed (interleaved), and the speedups."""
    deployment: dict[str, Any] | None = None
    """What a deployer needs (input, preprocessing, class names, compression); also in every artifact."""

    # how the folder was made, for the checks (not serialized)
    folder: Path | None = field(default=None, repr=False)
    """Where the files were written."""
    section: ExportSection | None = field(default=None, repr=False)
    """The export settings the files were written with (the checks time and re-export by them)."""
    input_size: int = field(default=0, repr=False)
    in_chans: int = field(default=3, repr=False)
    calibration: Tensor | None = field(default=None, repr=False)
    """The INT8 calibration images (a remedy re-quantizes with them)."""

    @property
    def ok(self) -> bool:
        """Parity passed and the graph keeps the factorized structure (True without ONNX or before the checks)."""
        if self.parity is None:
            return True
        return bool(self.parity["passed"] and (self.structure or {}).get("matches", False))

    def path(self, kind: str) -> Path:
        """Where artifact ``kind`` (safetensors, onnx, int8) is now."""
        if self.folder is None or kind not in self.files:
            raise ConfigError(f"this export has no {kind} file")
        return self.folder / self.files[kind]

    def record(self, kind: str, name: str) -> None:
        """Note that artifact ``kind`` is the file ``name`` in the folder (and its size)."""
        if self.folder is None:
            raise ConfigError("this export result has no folder to record files in")
        self.files[kind] = name
        self.sizes[kind] = (self.folder / name).stat().st_size

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in _KEYS}
        return jsonable({**{k: v for k, v in out.items() if v is not None}, "ok": self.ok})


def export_model(
    model: nn.Module,
    out_dir: str | Path,
    section: ExportSection | None = None,
    *,
    input_size: int,
    in_chans: int = 3,
    model_info: Mapping[str, Any] | None = None,
    class_names: Sequence[str] | None = None,
    preprocess: Mapping[str, Any] | None = None,
    recipe: Mapping[str, Any] | None = None,
    calibration: Tensor | None = None,
    calibration_source: str = "given images",
    **options: Any,
) -> ExportResult:
    """Write ``model`` (images in [0, 1] → logits) into ``out_dir``; see the module docstring.

    ``section``: the recipe's ``export`` section (default: its defaults); ``options`` are
    keyword shortcuts for its keys (``export_model(model, "out/", input_size=32, int8=True,
    calibration=images)``), validated as recipe keys are. Works for any module:
    ``model_info`` (:meth:`compressor.models.ModelInfo.to_dict`, for a model from
    ``create_model``) lets the safetensors file rebuild the model by name; without it
    :func:`~compressor.export.load_into` needs a skeleton. ``class_names`` (index order)
    and ``preprocess`` (how an image becomes an input; default: RGB, bilinear, [0, 1]) go into
    every artifact's deployment metadata. ``calibration``: images (N, C, H, W in [0, 1]) for
    INT8, required with ``int8``; ``calibration_source`` says where they came from.
    """
    section = resolve_section(ExportSection, section, options, source="export_model")
    out = Path(out_dir)
    if section.int8 and (not isinstance(calibration, Tensor) or calibration.dim() != 4 or not len(calibration)):
        raise ConfigError("INT8 export needs calibration images: an (N, C, H, W) tensor in [0, 1] of real inputs")
    if section.int8 and not section.onnx:
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
    result = ExportResult(
        deployment=deployment,
        folder=out,
        section=section,
        input_size=input_size,
        in_chans=in_chans,
        calibration=calibration if section.int8 else None,
    )
    if section.safetensors:
        save_compressed(model, out / SAFETENSORS_NAME, model_info=model_info, recipe=recipe, deployment=deployment)
        result.record("safetensors", SAFETENSORS_NAME)
    if not section.onnx:
        return result

    info = export_onnx(
        model,
        out / ONNX_NAME,
        input_size=input_size,
        in_chans=in_chans,
        opset=section.opset,
        metadata=onnx_metadata(deployment),
    )
    result.record("onnx", ONNX_NAME)
    result.onnx = {k: v for k, v in info.to_dict().items() if k not in ("path", "structure")}
    result.structure = info.structure  # computed once, by the export itself
    macs_c = count_macs(model, input_size, in_chans=in_chans)
    macs_d = count_macs(model, input_size, in_chans=in_chans, dense_equivalent=True)
    result.macs = {"compressed": macs_c, "dense": macs_d, "ratio": macs_d / macs_c if macs_c else None}
    if section.int8:
        result.int8 = quantize_int8(
            out / ONNX_NAME, out / INT8_NAME, calibration, activation_type=section.int8_activations
        )
        result.int8.pop("path", None)
        result.int8["calibration"] = calibration_source
        result.record("int8", INT8_NAME)
    return result
