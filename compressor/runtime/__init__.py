"""Run-time services every stage shares: the process group, the device, progress reporting,
the cost model (parameters, multiply-adds, compression rate), JSON and onnxruntime sessions.

Nothing here imports a pipeline stage or the layers; every stage imports from here. What the
cost model and the process group need of a factorized layer they ask through
:class:`FactorizedLayer` (:mod:`.factorized`).
"""

from .costs import CompressionStats, compression_stats, conv_costs, count_macs, linear_costs, macs_by_layer
from .device import autocast_context, resolve_device
from .distributed import DistContext, init_from_env, shutdown
from .factorized import FactorizedLayer, factorized_modules, is_factorized
from .progress import Progress, ProgressFactory, silent_progress
from .registry import registering
from .serialize import dumps, jsonable, ort_session

__all__ = [
    "CompressionStats",
    "DistContext",
    "FactorizedLayer",
    "Progress",
    "ProgressFactory",
    "autocast_context",
    "compression_stats",
    "conv_costs",
    "count_macs",
    "dumps",
    "factorized_modules",
    "init_from_env",
    "is_factorized",
    "jsonable",
    "linear_costs",
    "macs_by_layer",
    "ort_session",
    "registering",
    "resolve_device",
    "shutdown",
    "silent_progress",
]
