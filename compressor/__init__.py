"""compressor: make trained vision networks small and robust.

Pipeline (one module per stage): models → data → factorize → train (RobustDLRT) → evaluate
(attacks) → export (safetensors, ONNX).

    from compressor import compress
    result = compress(model, loader, beta=0.075)
"""

from .api import CompressionResult, compress
from .factorize import factorize_
from .layers import LowRankLinear, TuckerConv2d

__version__ = "0.1.0"


def load_compressed(path, **kwargs):
    """Rebuild a compressed model from its model.safetensors (see compressor.export)."""
    from .export import load_compressed as _load

    return _load(path, **kwargs)


__all__ = ["CompressionResult", "LowRankLinear", "TuckerConv2d", "compress", "factorize_", "load_compressed"]
