"""compressor: make trained vision networks small and robust.

The package follows the pipeline: models → data → factorize → train (RobustDLRT) → evaluate
(attacks) → export (safetensors, ONNX) → check (parity, accuracy, INT8, latency). Entry points on
top (``cli``, ``api``, ``pipeline``, sharing ``stages``), run-time services at the bottom (``runtime``).

    from compressor import check_export, compress, export_model
    result = compress(model, loader, beta=0.075)
    out = export_model(result.model, "out/", input_size=32, model_info=...)
    out = check_export(result.model, out, val_loader=val_loader)
"""

from .api import CompressionResult, compress
from .factorize import factorize_
from .layers import LowRankLinear, TuckerConv2d

__version__ = "0.1.0"


def load_compressed(path, **kwargs):
    """Rebuild a compressed model from its model.safetensors (see compressor.load)."""
    from .load import load_compressed as _load

    return _load(path, **kwargs)


def export_model(model, out_dir, *args, **kwargs):
    """Export a compressed model: safetensors, ONNX, INT8 (see compressor.export.export_model)."""
    from .export import export_model as _export

    return _export(model, out_dir, *args, **kwargs)


def check_export(model, exported, *args, **kwargs):
    """Check an export: parity, accuracy, INT8 against FP32, latency (see compressor.check.check_export)."""
    from .check import check_export as _check

    return _check(model, exported, *args, **kwargs)


__all__ = [
    "CompressionResult",
    "LowRankLinear",
    "TuckerConv2d",
    "check_export",
    "compress",
    "export_model",
    "factorize_",
    "load_compressed",
]
