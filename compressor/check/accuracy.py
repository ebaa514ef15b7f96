"""The exported ONNX models against PyTorch: parity on random images, accuracy on validation data."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from ..evaluate import evaluate_onnx
from ..export import ExportResult, parity_check
from ..recipe import EvaluateSection


def parity(model: nn.Module, exported: ExportResult) -> dict[str, Any]:
    """max |ONNX − PyTorch| logits of the FP32 ONNX model on random images, per batch size."""
    return parity_check(exported.path("onnx"), model, input_size=exported.input_size)


def onnx_accuracy(
    model: nn.Module,
    exported: ExportResult,
    kind: str,
    val_loader: Iterable[Any],
    evaluation: EvaluateSection,
    *,
    std: Sequence[float] | None,
    adversarial: Mapping[tuple[str, float], Tensor] | None,
) -> dict[str, Any]:
    """:func:`~compressor.evaluate.evaluate_onnx` of artifact ``kind`` (onnx, int8) beside ``model``.

    The record names the file by its name in the export folder, not by the path it was scored
    at: the pipeline exports into a staging folder that is renamed into place afterwards.
    """
    result = evaluate_onnx(
        exported.path(kind), val_loader, evaluation, torch_model=model, std=std, adversarial=adversarial or None
    ).to_dict()
    result["settings"]["onnx_path"] = exported.files[kind]
    return result
