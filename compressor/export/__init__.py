"""Export: compressed safetensors with a manifest, plain-op ONNX, INT8 QDQ ONNX, metadata.

    result = export_model(model, "out/", input_size=32, model_info=info.to_dict())  # the files
    model, manifest = load_into("out/model.safetensors", skeleton)                  # filled from the file

export/ writes artifacts; what they are worth (parity, accuracy, INT8 against FP32, latency)
is measured by :mod:`compressor.check` afterwards, and a model is rebuilt by name from its file
alone by :func:`compressor.load_compressed` (export/ builds no model). The pieces:
save_compressed / read_compressed / load_into (safetensors), export_onnx / parity_check /
structure_check (ONNX), quantize_int8, onnx_latencies (the timing tool the latency check uses).
"""

from .bundle import INT8_NAME, ONNX_NAME, SAFETENSORS_NAME, SUMMARY_NAME, ExportResult, export_model
from .latency import LATENCY_BATCH_SIZES, onnx_latencies, onnx_latency
from .metadata import DEPLOYMENT_KEY, deployment_metadata
from .onnx_export import (
    PARITY_TOLERANCE,
    LayerForm,
    OnnxExportInfo,
    export_onnx,
    parity_check,
    plain_model,
    plan_export,
    structure_check,
)
from .quantize import quantize_int8
from .safetensors_io import (
    FORMAT_VERSION,
    build_low_rank_like,
    build_manifest,
    load_into,
    read_compressed,
    read_header,
    save_compressed,
)

__all__ = [
    "DEPLOYMENT_KEY",
    "FORMAT_VERSION",
    "INT8_NAME",
    "LATENCY_BATCH_SIZES",
    "ONNX_NAME",
    "PARITY_TOLERANCE",
    "SAFETENSORS_NAME",
    "SUMMARY_NAME",
    "ExportResult",
    "LayerForm",
    "OnnxExportInfo",
    "build_low_rank_like",
    "build_manifest",
    "deployment_metadata",
    "export_model",
    "export_onnx",
    "load_into",
    "onnx_latencies",
    "onnx_latency",
    "parity_check",
    "plain_model",
    "plan_export",
    "quantize_int8",
    "read_compressed",
    "read_header",
    "save_compressed",
    "structure_check",
]
