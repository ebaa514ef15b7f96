"""A layer's measured latency per export form on a grid of ranks, and its prediction between.

A form's time depends on some of the layer's rank modes only (a Tucker conv's ``tucker3`` on
both, ``fold_out`` on r_in, ``fold_in`` on r_out, ``dense`` on none); its table holds one
median per grid point of those modes. Between grid points the prediction is multilinear
(linear on one mode, bilinear on two), so it is exact at grid points and lies between the
values of the surrounding grid points; outside the grid it is the nearest edge's value (a
rank below the first grid point costs as much as that point: runtimes' kernels work in
blocks, so a smaller rank is rarely faster).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class FormTable:
    """Milliseconds of one form on the grid ``axes`` of the rank modes ``modes``."""

    modes: tuple[int, ...]
    axes: tuple[tuple[int, ...], ...]
    values: Any
    """Nested lists, one level per mode (a float for a form that depends on no rank)."""

    def __post_init__(self) -> None:
        if len(self.modes) != len(self.axes):
            raise ValueError(f"{len(self.modes)} modes but {len(self.axes)} axes")
        for axis in self.axes:
            if not axis or list(axis) != sorted(set(axis)):
                raise ValueError(f"a grid axis must be increasing and non-empty, got {axis}")

    def _value(self, index: Sequence[int]) -> float:
        v = self.values
        for i in index:
            v = v[i]
        return float(v)

    def predict(self, ranks: Sequence[int]) -> float:
        """Milliseconds at ``ranks`` (every mode of the layer; the modes this form does not
        depend on are ignored): multilinear between grid points, clamped at the edges."""
        brackets = []
        for mode, axis in zip(self.modes, self.axes):
            r = min(max(float(ranks[mode]), axis[0]), axis[-1])
            hi = min(bisect.bisect_left(axis, r), len(axis) - 1)
            lo = hi if axis[hi] == r or hi == 0 else hi - 1
            t = 0.0 if hi == lo else (r - axis[lo]) / (axis[hi] - axis[lo])
            brackets.append(((lo, 1.0 - t), (hi, t)))
        total = 0.0
        for corner in itertools.product(*brackets):
            weight = math.prod(w for _, w in corner)
            if weight:
                total += weight * self._value([i for i, _ in corner])
        return total

    def to_dict(self) -> dict[str, Any]:
        return {"modes": list(self.modes), "axes": [list(a) for a in self.axes], "values": self.values}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FormTable:
        return cls(tuple(int(m) for m in d["modes"]), tuple(tuple(int(r) for r in a) for a in d["axes"]), d["values"])


@dataclass(frozen=True)
class LayerTable:
    """Every form's table of one layer shape (a :class:`~compressor.layers.LatencyKey`)."""

    forms: dict[str, FormTable] = field(default_factory=dict)

    def predict(self, form: str, ranks: Sequence[int]) -> float:
        return self.forms[form].predict(ranks)

    def fastest(self, ranks: Sequence[int], forms: Sequence[str] | None = None) -> tuple[str, float]:
        """(form, milliseconds) of the fastest of ``forms`` (default: all measured) at
        ``ranks``; the first of equals, in the order given."""
        names = [f for f in (forms if forms is not None else self.forms) if f in self.forms]
        if not names:
            raise KeyError(f"no measured form among {list(forms or [])}")
        times = [(self.forms[f].predict(ranks), i, f) for i, f in enumerate(names)]
        ms, _, form = min(times)
        return form, ms

    def to_dict(self) -> dict[str, Any]:
        return {form: t.to_dict() for form, t in self.forms.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerTable:
        return cls({form: FormTable.from_dict(t) for form, t in d.items()})


def lower_envelope(values: Any) -> Any:
    """Each grid value replaced by the smallest value at any grid point with every rank at
    least as large (nested lists, one level per mode). A timing on a shared machine is the
    true time plus whatever other processes added, never less, and a form at lower ranks does
    no more work: where a lower rank was timed slower, the larger rank's time is the better
    estimate of both."""
    if not isinstance(values, list):
        return values
    rows = [lower_envelope(v) for v in values]
    for i in range(len(rows) - 2, -1, -1):
        rows[i] = _elementwise_min(rows[i], rows[i + 1])
    return rows


def _elementwise_min(a: Any, b: Any) -> Any:
    if isinstance(a, list):
        return [_elementwise_min(x, y) for x, y in zip(a, b)]
    return min(a, b)


def rank_grid(cap: int, *, coarse: bool = False, step: int = 8) -> tuple[int, ...]:
    """The ranks a mode is timed at, and ``cap`` itself.

    One mode: every multiple of ``step`` up to 8·step, where a step is a large share of the
    rank, then every 4·step. ``coarse`` (each mode of a two-mode form, whose grid is the
    product of two): step, 2·step, 4·step, 8·step, 12·step, then every 8·step, none within
    4·step of the cap. A form's multiply-adds are linear in one rank and bilinear in two,
    which the interpolation reproduces exactly: the grid points measure how far the kernels'
    speed departs from that, and the large ranks, which hold most of the time a table takes
    to measure, are the sparse ones.
    """
    if cap < 1:
        raise ValueError(f"a rank cap must be positive, got {cap}")
    if coarse:
        points = [m * step for m in (1, 2, 4, 8, 12)] + list(range(16 * step, cap - 4 * step, 8 * step))
    else:
        points = list(range(step, 8 * step + 1, step)) + list(range(12 * step, cap + 1, 4 * step))
    return tuple(sorted({r for r in points if r < cap} | {cap}))


__all__ = ["FormTable", "LayerTable", "lower_envelope", "rank_grid"]
