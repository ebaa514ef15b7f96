"""INT8 remedies: what the INT8 check tries, in turn, when INT8 loses too much accuracy.

A remedy proposes one or more :class:`Candidate` quantizations (keyword arguments of
:func:`compressor.export.quantize_int8`, named as the report lists them); the search in
:mod:`compressor.check.int8` quantizes and scores every candidate of a remedy and stops after
the first remedy that brings INT8 within the tolerance. A remedy sees the search
(:class:`~compressor.check.int8.Int8Search`: the FP32 model, the calibration images, a scorer on
the validation data, what was tried, the options of the best candidate so far), so one that
must measure before it proposes can; its candidates are quantized and scored one by one as it
yields them, so it may stop once the last one holds. A new remedy is one file, imported by the
package's ``__init__``:

    @register_remedy(order=50)
    class PerTensorWeights:
        name = "per-tensor weights"
        def candidates(self, search):
            yield Candidate("per-tensor weights", {**search.calibration_options(), "per_channel": False})

In order: calibration chosen by validation (:mod:`.calibrators`, order 10), the first and the
last layers in float (below, order 100: the layers whose quantization error reaches the input
features and the logits most directly; Nagel et al., "A White Paper on Neural Network
Quantization", 2021, §4), the most sensitive layers in float (:mod:`.sensitivity`, order 200).
The later ones keep the calibration the earlier ones chose.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..export.quantize import PERCENTILE

if TYPE_CHECKING:
    from .int8 import Int8Search

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """One quantization to try: its name in the report and :func:`quantize_int8`'s options."""

    variant: str
    options: Mapping[str, Any] = field(default_factory=dict)


class Remedy(Protocol):
    name: str

    def candidates(self, search: Int8Search) -> Iterable[Candidate]:
        """The quantizations this remedy tries, given what the search has measured so far."""
        ...


_REGISTRY: list[tuple[int, Remedy]] = []


def register_remedy(order: int) -> Callable[[type], type]:
    """Class decorator: try this remedy (an instance of the class) after those of lower ``order``."""

    def deco(cls: type) -> type:
        remedy = cls()
        for k, (_, known) in enumerate(_REGISTRY):
            if known.name == remedy.name:
                log.warning("INT8 remedy %r re-registered", remedy.name)
                del _REGISTRY[k]
                break
        _REGISTRY.append((order, remedy))
        _REGISTRY.sort(key=lambda item: item[0])
        return cls

    return deco


def describe(options: Mapping[str, Any]) -> str:
    """A quantization's name in the report, from :func:`quantize_int8`'s options."""
    method = options.get("calibration", "minmax")
    name = {"minmax": "MinMax", "entropy": "entropy"}.get(method, method)
    if method == "percentile":
        name += f" {options.get('percentile', PERCENTILE):g}"
    parts = [f"{name} calibration"]
    if options.get("float_ends"):
        parts.append("first and last layers in float")
    if options.get("float_layers"):
        n = len(options["float_layers"])
        parts.append(f"{n} most sensitive layer{'s' if n > 1 else ''} in float")
    if options.get("per_channel") is False:
        parts.append("per-tensor weights")
    return ", ".join(parts)


def list_remedies() -> list[Remedy]:
    """The registered remedies, in the order they are tried."""
    return [remedy for _, remedy in _REGISTRY]


@register_remedy(order=100)
class FloatEnds:
    """The first and the last Conv/MatMul/Gemm kept in float, weights per channel."""

    name = "first and last layers in float"

    def candidates(self, search: Int8Search) -> Iterable[Candidate]:
        options = {**search.calibration_options(), "float_ends": True}
        yield Candidate(describe(options), options)
