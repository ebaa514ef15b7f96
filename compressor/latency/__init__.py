"""A measured latency model of this machine for factorized layers: every export form of every
layer shape timed by onnxruntime on a grid of ranks, cached on disk, interpolated between
(see :mod:`.model`). A latency budget (``train.target.latency``) allocates ranks with it."""

from .cache import CACHE_ENV, LatencyCache, default_cache_dir
from .model import LatencyModel, build_latency_model, set_export_forms
from .networks import Calibration, layer_inputs, network_in_forms
from .settings import PRECISIONS, LatencySettings, cpu_model, onnxruntime_version
from .table import FormTable, LayerTable, rank_grid
from .timing import form_ops, measure_layer, time_onnx, write_form_graph

__all__ = [
    "CACHE_ENV",
    "Calibration",
    "PRECISIONS",
    "FormTable",
    "LatencyCache",
    "LatencyModel",
    "LatencySettings",
    "LayerTable",
    "build_latency_model",
    "cpu_model",
    "default_cache_dir",
    "network_in_forms",
    "form_ops",
    "layer_inputs",
    "measure_layer",
    "onnxruntime_version",
    "rank_grid",
    "set_export_forms",
    "time_onnx",
    "write_form_graph",
]
