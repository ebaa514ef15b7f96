"""The check stage: every check of an export folder, in order, after the export wrote it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from ..export import ExportResult
from ..recipe import EvaluateSection
from .accuracy import onnx_accuracy, parity
from .int8 import check_int8
from .latency import latency


def check_export(
    model: nn.Module,
    exported: ExportResult,
    evaluation: EvaluateSection | None = None,
    *,
    val_loader: Iterable[Any] | None = None,
    std: Sequence[float] | None = None,
    adversarial: Mapping[tuple[str, float], Tensor] | None = None,
    dense_model: nn.Module | None = None,
) -> ExportResult:
    """Measure what :func:`~compressor.export.export_model` wrote for ``model``; fills in and
    returns ``exported``.

    Parity of the ONNX model with ``model``; with ``val_loader``: the ONNX model's accuracy
    (beside ``model``'s), and INT8 against it, with the remedies tried while INT8 loses more
    than the export section's ``int8_max_drop`` (the best candidate replaces the INT8 file);
    with the export section's ``latency``: onnxruntime latency of the compressed, INT8 and
    (``dense_model``, exported here for timing only) dense models side by side.
    ``evaluation``: the recipe's ``evaluate`` section whose attacks the ONNX models are also
    scored on (None: clean accuracy only; ``std`` is the model's normalization, the attacks'
    ``std``); ``adversarial``: ``model``'s adversarial images from
    ``evaluate(..., keep_adversarial=True)``, scored instead of crafted again.
    """
    if "onnx" not in exported.files:
        return exported  # nothing but safetensors: exact by construction (load_compressed checks it)
    model = model.cpu().eval()
    evaluation = evaluation if evaluation is not None else EvaluateSection(attacks=[])
    scored = dict(val_loader=val_loader, evaluation=evaluation, std=std, adversarial=adversarial)
    exported.parity = parity(model, exported)
    if val_loader is not None:
        exported.onnx_eval = onnx_accuracy(model, exported, "onnx", **scored)
    if "int8" in exported.files:
        exported.int8 = check_int8(exported, exported.onnx_eval, val_loader)
        if val_loader is not None and evaluation.attacks:
            exported.int8["eval"] = onnx_accuracy(model, exported, "int8", **scored)
    if exported.section is not None and exported.section.latency:
        exported.latency = latency(exported, dense_model)
    return exported
