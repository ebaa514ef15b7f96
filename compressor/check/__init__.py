"""The check stage: what an export folder is worth, measured after :mod:`compressor.export` wrote it.

    exported = export_model(model, "out/", recipe.export, input_size=32, calibration=images)  # files
    exported = check_export(model, exported, recipe.evaluate, val_loader=val)                 # figures

One check a file: ONNX-vs-PyTorch parity and ONNX accuracy (:mod:`.accuracy`), INT8 accuracy
against FP32 with its remedies tried in turn (:mod:`.int8`, the remedies in :mod:`.remedies`),
latency of the dense and the compressed model side by side (:mod:`.latency`); :mod:`.stage`
runs them in order. An INT8 remedy (:mod:`.calibrators`: calibration chosen by validation;
:mod:`.sensitivity`: the most sensitive layers in float) is one file registering itself with
:func:`register_remedy`, imported here.
"""

from . import calibrators, sensitivity  # noqa: F401 (the remedies register themselves on import)
from .calibration import CALIBRATION_IMAGES, calibration_images
from .int8 import EXPORTED_VARIANT, INT8_MAX_DROP, Int8Search
from .remedies import Candidate, Remedy, list_remedies, register_remedy
from .stage import check_export

__all__ = [
    "CALIBRATION_IMAGES",
    "EXPORTED_VARIANT",
    "INT8_MAX_DROP",
    "Candidate",
    "Int8Search",
    "Remedy",
    "calibration_images",
    "check_export",
    "list_remedies",
    "register_remedy",
]
