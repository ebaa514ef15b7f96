"""Export: compressed safetensors with a manifest, plain-op ONNX, INT8, latency.

    result = export_model(model, "out/", input_size=32, model_info=info.to_dict())  # everything, checked
    model, manifest = load_compressed("out/model.safetensors")                        # rebuilt from the file
    export_saved("out/model.safetensors", "out/")                                     # `compress export`

The pieces: save_compressed / load_compressed (safetensors), export_onnx / parity_check /
structure_check (ONNX), quantize_int8, onnx_latencies.
"""

from .bundle import CALIBRATION_IMAGES, INT8_MAX_DROP, ExportResult, export_model, export_saved
from .latency import onnx_latencies, onnx_latency
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
    load_compressed,
    read_header,
    save_compressed,
)

__all__ = [
    "CALIBRATION_IMAGES",
    "DEPLOYMENT_KEY",
    "INT8_MAX_DROP",
    "deployment_metadata",
    "FORMAT_VERSION",
    "PARITY_TOLERANCE",
    "ExportResult",
    "LayerForm",
    "OnnxExportInfo",
    "build_low_rank_like",
    "build_manifest",
    "export_model",
    "export_onnx",
    "export_saved",
    "load_compressed",
    "onnx_latencies",
    "onnx_latency",
    "parity_check",
    "plain_model",
    "plan_export",
    "quantize_int8",
    "read_header",
    "save_compressed",
    "structure_check",
]
