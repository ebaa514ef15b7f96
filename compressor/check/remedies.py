"""INT8 remedies: what the INT8 check tries, in turn, when INT8 loses too much accuracy.

A remedy proposes one or more :class:`Candidate` quantizations (keyword arguments of
:func:`compressor.export.quantize_int8`, named as the report lists them); the search in
:mod:`compressor.check.int8` quantizes and scores every candidate of a remedy and stops after
the first remedy that brings INT8 within the tolerance. A remedy sees the search
(:class:`~compressor.check.int8.Int8Search`: the FP32 model, the calibration images, a scorer on
the validation data, what was tried), so one that must measure before it proposes (which
layers are sensitive, which calibration scores best) can. A new remedy is one file:

    @register_remedy(order=50)
    class KeepSensitiveLayers:
        name = "sensitive layers in float"
        def candidates(self, search): ...

The standard remedy below keeps the first and the last layers in float (the layers whose
quantization error reaches the input features and the logits most directly; Nagel et al.,
"A White Paper on Neural Network Quantization", 2021, §4).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

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


def list_remedies() -> list[Remedy]:
    """The registered remedies, in the order they are tried."""
    return [remedy for _, remedy in _REGISTRY]


@register_remedy(order=100)
class FloatEnds:
    """The first and the last Conv/MatMul/Gemm kept in float, weights per channel."""

    name = "first and last layers in float"

    def candidates(self, search: Int8Search) -> Iterable[Candidate]:
        yield Candidate(
            "per-channel weights, first and last layers in float", {"per_channel": True, "float_ends": True}
        )
