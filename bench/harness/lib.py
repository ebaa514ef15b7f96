"""Every name the bench scripts take from compressor, in this one place: when the package's API
moves, this is the file to edit."""

# ruff: noqa: F401  (re-exports)

from compressor import functional
from compressor.atomic import atomic_path, write_text
from compressor.attacks import create_attack
from compressor.check.calibration import calibration_images
from compressor.cli import enable_huge_pages
from compressor.data import (
    FASHION_MNIST_DEFAULT_ROOT,
    TensorImages,
    build_data,
    read_idx_images,
    read_idx_labels,
    set_epoch,
)
from compressor.errors import CompressorError, UnreachableTargetError
from compressor.evaluate import evaluate, evaluate_onnx
from compressor.export import export_onnx, onnx_latencies, parity_check, quantize_int8
from compressor.export.forms import EXPORT_FORM_ATTR
from compressor.export.onnx_export import plain_model, plan_export
from compressor.factorize import break_even_rank, factorize_
from compressor.layers import LowRankLinear, TuckerConv2d, low_rank_layers
from compressor.models import NormalizedClassifier, create_model
from compressor.recipe import BaselineSection, DataSection, Recipe, TrainSection, recipe_from_dict
from compressor.report import plot_kappa, plot_spectra
from compressor.runtime import compression_stats, count_macs, dumps, macs_by_layer, silent_progress
from compressor.stages import certificate, factorize_and_train, layer_spectrum, layer_summary
from compressor.train import Trainer, clean_accuracy
from compressor.train.batchnorm import reestimate_batchnorm_
from compressor.train.common import guarded_step


def plain_layer(layer, form: str):
    """The exporter's plain modules for one factorized layer in ``form`` (``LowRankLayer.export_module``)."""
    return layer.export_module(form)
