"""A latency model of this machine for one factorized network (NetAdapt's and HALP's measured
lookup tables, here per export form on a grid of ranks).

:func:`build_latency_model` times, for every distinct :class:`~compressor.layers.LatencyKey`
of the network's factorized layers, each export form on its rank grid as a stand-alone graph
(:mod:`.timing`), then the whole network side by side in two versions — every factorized layer
dense, and every one in its fastest form at its smallest timed ranks (:mod:`.networks`). A
stand-alone graph does not take what its layer takes inside the network (it pays its own
session call and layout conversions, and on a loaded machine graphs timed seconds apart see
different loads), so the tables are tied to the network by a straight line through both
versions:

    network(ranks) = rest + κ · Σ_layers min over forms f of table_layer,f(ranks_layer)

κ = (dense network − small network) / Σ_layers (dense − smallest) in the tables: the share of a
stand-alone saving that the network sees; rest = dense network − κ · Σ_layers dense: what the
layers do not account for (the first conv, pooling, activations, the classifier head). Both
versions are predicted at their measured times, and a target, a fraction of the dense network,
is a ratio of two networks timed side by side. Should the line not fit (κ ≤ 0 or a negative
rest, from noise), κ = dense network / Σ dense and rest = 0. The fastest form may be
``dense``; the export then writes the layer dense (:func:`set_export_forms`).

Tables and the networks' timings are cached on disk (:mod:`.cache`): a second build on the
same machine, runtime and settings measures nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..layers import LatencyKey, LowRankLayer, low_rank_layers
from .cache import LatencyCache
from .networks import Calibration, calibrate, layer_inputs, model_fingerprint
from .settings import LatencySettings
from .table import LayerTable, rank_grid
from .timing import Timer, layer_forms, measure_layer, time_onnx

log = logging.getLogger(__name__)


@dataclass
class LatencyModel:
    """Measured tables of one network's factorized layers (see the module docstring)."""

    settings: LatencySettings
    tables: dict[str, LayerTable]
    """Layer name → its shape's table (layers of equal shape share one)."""
    forms: dict[str, tuple[str, ...]]
    """Layer name → the forms the export may write it in (its export forms and dense)."""
    calibration: Calibration
    small: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """Layer name → the smallest timed ranks (the small network's)."""
    keys: dict[str, LatencyKey] = field(default_factory=dict)
    measured_graphs: int = 0
    """Graphs timed by the build (0: everything came from the cache)."""
    seconds: float = 0.0

    def __post_init__(self) -> None:
        c = self.calibration
        dense = sum(t.predict("dense", ()) for t in self.tables.values())
        small = sum(self.tables[n].fastest(self.small[n], self.forms[n])[1] for n in self.tables if n in self.small)
        kappa = (
            (c.dense_ms - c.small_ms) / (dense - small) if dense > small and len(self.small) == len(self.tables) else 0
        )
        rest = c.dense_ms - kappa * dense
        if kappa <= 0 or rest < 0:
            kappa, rest = (c.dense_ms / dense if dense > 0 else 1.0), 0.0
        self.kappa, self.rest_ms = kappa, rest

    @property
    def dense_ms(self) -> float:
        """The whole network with every factorized layer dense."""
        return self.calibration.dense_ms

    def layer_ms(self, name: str, ranks: tuple[int, ...]) -> tuple[str, float]:
        """(form, milliseconds inside the network) of the fastest form of layer ``name`` at ``ranks``."""
        form, ms = self.tables[name].fastest(ranks, self.forms[name])
        return form, ms * self.kappa

    def layer_form_ms(self, name: str, form: str, ranks: tuple[int, ...]) -> float:
        """Milliseconds inside the network of layer ``name`` in ``form`` at ``ranks``."""
        return self.tables[name].predict(form, ranks) * self.kappa

    def standalone_ms(self, name: str, form: str, ranks: tuple[int, ...]) -> float:
        """Milliseconds of the layer's stand-alone graph in ``form`` at ``ranks`` (the table)."""
        return self.tables[name].predict(form, ranks)

    def cost_fn(self, name: str) -> Callable[[tuple[int, ...]], float]:
        """ranks → predicted milliseconds of layer ``name`` (its fastest form), for the budget."""
        return lambda ranks: self.layer_ms(name, ranks)[1]

    def predict(self, ranks: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
        """The network at ``ranks`` (every factorized layer): total and per-layer milliseconds,
        the form each layer takes, and the fraction of the dense network's time."""
        layers = {}
        for name in self.tables:
            form, ms = self.layer_ms(name, tuple(ranks[name]))
            layers[name] = {
                "ranks": list(ranks[name]),
                "form": form,
                "ms": ms,
                "dense_ms": self.layer_form_ms(name, "dense", tuple(ranks[name])),
            }
        total = self.rest_ms + sum(v["ms"] for v in layers.values())
        return {
            "ms": total,
            "dense_ms": self.dense_ms,
            "rest_ms": self.rest_ms,
            "fraction": total / self.dense_ms if self.dense_ms > 0 else 0.0,
            "layers": layers,
        }

    def export_forms(self, ranks: Mapping[str, tuple[int, ...]]) -> dict[str, str]:
        """Layer → its fastest form at ``ranks``: what the export writes."""
        return {name: self.layer_ms(name, tuple(ranks[name]))[0] for name in self.tables}

    def summary(self) -> dict[str, Any]:
        return {
            "settings": self.settings.to_dict(),
            "dense_ms": self.dense_ms,
            "small_ms": self.calibration.small_ms,
            "rest_ms": self.rest_ms,
            "kappa": self.kappa,
            "layer_shapes": len(set(self.keys.values())),
            "measured_graphs": self.measured_graphs,
            "seconds": self.seconds,
        }


def set_export_forms(model: nn.Module, latency: LatencyModel) -> dict[str, str]:
    """Mark every factorized layer of ``model`` with its fastest form at its current ranks
    (:data:`compressor.export.forms.EXPORT_FORM_ATTR`), which the export then writes;
    returns {layer: form}."""
    from ..export.forms import EXPORT_FORM_ATTR

    layers = low_rank_layers(model)
    forms = latency.export_forms({name: tuple(layer.ranks) for name, layer in layers.items() if name in latency.tables})
    for name, layer in layers.items():
        setattr(layer, EXPORT_FORM_ATTR, forms.get(name))
    return forms


def smallest_ranks(layer: LowRankLayer) -> tuple[int, ...]:
    """Every mode at the smallest rank its tables are timed at."""
    return tuple(rank_grid(int(cap))[0] for cap in layer.rank_caps)


def build_latency_model(
    model: nn.Module,
    settings: LatencySettings,
    *,
    cache: LatencyCache | None = None,
    timer: Timer = time_onnx,
) -> LatencyModel:
    """Load or measure the tables of ``model``'s factorized layers and the network's
    calibration (see the module docstring). ``cache``: where they live (default:
    :func:`.cache.default_cache_dir`); ``timer``: how graphs are timed."""
    start = time.perf_counter()
    cache = cache if cache is not None else LatencyCache()
    context = settings.context()
    layers: dict[str, LowRankLayer] = low_rank_layers(model)
    inputs = layer_inputs(model, settings)
    keys = {name: layers[name].latency_key(shape) for name, shape in inputs.items()}
    by_key: dict[LatencyKey, LayerTable] = {}
    measured = 0
    for name, key in keys.items():
        if key in by_key:
            continue
        entry = {**context, "layer": key.to_dict()}
        stored = cache.load(entry)
        if stored is not None:
            by_key[key] = LayerTable.from_dict(stored)
            continue
        t = time.perf_counter()
        table, n = measure_layer(layers[name], inputs[name], settings, timer=timer)
        measured += n
        by_key[key] = table
        cache.store(entry, table.to_dict())
        log.info("latency model: %s (%s) timed in %d graphs, %.1fs", name, _describe(key), n, time.perf_counter() - t)
    tables = {name: by_key[key] for name, key in keys.items()}
    forms = {name: layer_forms(layers[name]) for name in keys}
    entry = {**context, "network": model_fingerprint(model, keys, settings)}
    small = {name: smallest_ranks(layers[name]) for name in keys}
    stored = cache.load(entry)
    if stored is not None:
        calibration = Calibration.from_dict(stored)
    else:
        t = time.perf_counter()
        small_forms = {name: (tables[name].fastest(small[name], forms[name])[0], small[name]) for name in keys}
        calibration = calibrate(model, small_forms, settings, timer)
        measured += 2
        cache.store(entry, calibration.to_dict())
        log.info(
            "latency model: the network takes %.2f ms dense, %.2f ms at the smallest ranks (timed in %.1fs)",
            calibration.dense_ms,
            calibration.small_ms,
            time.perf_counter() - t,
        )
    result = LatencyModel(settings, tables, forms, calibration, small, keys, measured, time.perf_counter() - start)
    if measured:
        log.info(
            "latency model: %d layer shapes, %d graphs timed in %.1fs (cached in %s)",
            len(by_key),
            measured,
            result.seconds,
            cache.folder,
        )
    else:
        log.info("latency model: %d layer shapes and the network from the cache %s", len(by_key), cache.folder)
    return result


def _describe(key: LatencyKey) -> str:
    return ", ".join(f"{k} {v}" for k, v in key.to_dict().items())


__all__ = ["LatencyModel", "build_latency_model", "set_export_forms", "smallest_ranks"]
