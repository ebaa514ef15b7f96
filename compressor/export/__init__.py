"""Export: compressed safetensors with a manifest, plain-op ONNX, INT8, latency and MACs.

    save_compressed(model, path, model_info=info.to_dict())   # exact-size factors + manifest
    model, manifest = load_compressed(path)                   # rebuilt from the file alone
    info = export_onnx(model, "model.onnx", input_size=32)    # Conv/MatMul/Gemm, dynamic batch
    structure_check("model.onnx", model); parity_check("model.onnx", model)
    export_checkpoint(path, out_dir)                          # all of it, for `compress export`
"""

from .artifact import export_checkpoint
from .latency import count_macs, macs_by_layer, onnx_latencies, onnx_latency
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
from .safetensors_io import FORMAT_VERSION, build_low_rank_like, build_manifest, load_compressed, read_header, save_compressed

__all__ = [
    "FORMAT_VERSION", "PARITY_TOLERANCE", "LayerForm", "OnnxExportInfo", "build_low_rank_like", "build_manifest",
    "count_macs", "export_checkpoint", "macs_by_layer", "export_onnx", "load_compressed", "onnx_latencies",
    "onnx_latency", "parity_check",
    "plain_model", "plan_export", "quantize_int8", "read_header", "save_compressed", "structure_check",
]
