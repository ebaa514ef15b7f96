"""INT8 remedy: the activation-range calibration chosen by validation accuracy.

The exported INT8 model is calibrated by MinMax, which lets a single extreme activation set a
tensor's whole range. When it loses too much accuracy, the percentile calibrator (the
:data:`~compressor.export.quantize.PERCENTILE` share of values kept) and the entropy
calibrator (the range minimizing the KL divergence between the float and the quantized
histogram; Migacz, "8-bit Inference with TensorRT", GTC 2017) are tried too; the search keeps
the most accurate on the validation split, ties going to the earlier, cheaper method (MinMax,
then percentile, then entropy). The remedies after this one keep its choice, and the report
lists each method's accuracy (``calibration_methods``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..export.quantize import CALIBRATIONS, PERCENTILE
from .remedies import Candidate, describe, register_remedy

if TYPE_CHECKING:
    from .int8 import Int8Search


@register_remedy(order=10)
class ChosenCalibration:
    """Every calibration method not yet tried with all layers quantized."""

    name = "calibration chosen by validation"

    def candidates(self, search: Int8Search) -> Iterable[Candidate]:
        done = {t["calibrate_method"] for t in search.tried if not t["float_layers"] and not t["float_ends"]}
        for method in CALIBRATIONS:
            if method not in done:
                options = {"calibration": method, **({"percentile": PERCENTILE} if method == "percentile" else {})}
                yield Candidate(describe(options), options)
