"""Run-time services every stage shares: the process group, the device, progress reporting,
the cost model (parameters, multiply-adds, compression rate), JSON and onnxruntime sessions.

Nothing here imports a pipeline stage; every stage imports from here.
"""

from .costs import CompressionStats, compression_stats, conv_costs, count_macs, layer_costs, linear_costs, macs_by_layer
from .device import autocast_context, resolve_device
from .distributed import DistContext, init_from_env, shutdown
from .progress import Progress, ProgressFactory, silent_progress
from .serialize import dumps, jsonable, ort_session

__all__ = [
    "CompressionStats",
    "DistContext",
    "Progress",
    "ProgressFactory",
    "autocast_context",
    "compression_stats",
    "conv_costs",
    "count_macs",
    "dumps",
    "init_from_env",
    "jsonable",
    "layer_costs",
    "linear_costs",
    "macs_by_layer",
    "ort_session",
    "resolve_device",
    "shutdown",
    "silent_progress",
]
