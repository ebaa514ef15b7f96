"""compressor: make trained vision networks small and robust.

The package follows the pipeline: models → data → factorize → train (RobustDLRT) → evaluate
(attacks) → export (safetensors, ONNX). Entry points on top (``cli``, ``api``, ``pipeline``,
sharing ``stages``), run-time services at the bottom (``runtime``).

    from compressor import compress, export_model
    result = compress(model, loader, beta=0.075)
    export_model(result.model, "out/", input_size=32, model_info=...)
"""

from .api import CompressionResult, compress
from .factorize import factorize_
from .layers import LowRankLinear, TuckerConv2d

__version__ = "0.1.0"


def load_compressed(path, **kwargs):
    """Rebuild a compressed model from its model.safetensors (see compressor.export)."""
    from .export import load_compressed as _load

    return _load(path, **kwargs)


def export_model(model, out_dir, **kwargs):
    """Export a compressed model: safetensors, ONNX, checks (see compressor.export.export_model)."""
    from .export import export_model as _export

    return _export(model, out_dir, **kwargs)


__all__ = [
    "CompressionResult",
    "LowRankLinear",
    "TuckerConv2d",
    "compress",
    "export_model",
    "factorize_",
    "load_compressed",
]
