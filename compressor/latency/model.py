"""A latency model of this machine for one factorized network (NetAdapt's and HALP's measured
lookup tables, here per export form on a grid of ranks).

:func:`build_latency_model` times, for every distinct :class:`~compressor.layers.LatencyKey`
of the network's factorized layers, each export form on its rank grid as a stand-alone graph
(:mod:`.timing`), then the whole network side by side in three versions — every factorized
layer dense, every one in its fastest form at its smallest timed ranks, and every one in its
fastest form in the middle of its grid (:mod:`.networks`). A stand-alone graph does not take
what its layer takes inside the network: it pays its own session call and layout conversions,
and a network's ops wait on one another and on the runtime's worker threads, which on a loaded
machine is a large part of the time, in a proportion that changes with the ops' size. So the
tables only rank the layers' forms and ranks, and the network's time is a calibration curve
of the sum of its layers' tables:

    network(ranks) = g(Σ_layers min over forms f of table_layer,f(ranks_layer))

g is piecewise linear through the three versions timed (exact there, linear between them and
beyond), made non-decreasing where noise says otherwise. g is increasing, so a budget on the
network is a budget on the sum of the tables, g⁻¹(target), which the allocation spends layer by
layer; a target, a fraction of the dense network, is thus a ratio of networks timed side by
side. The fastest form may be ``dense``; the export then writes the layer dense
(:func:`set_export_forms`).

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
from .networks import Calibration, Version, calibrate, layer_inputs, model_fingerprint
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
    versions: dict[str, Version] = field(default_factory=dict)
    """Calibration label → the network version timed (layer → (form, ranks))."""
    keys: dict[str, LatencyKey] = field(default_factory=dict)
    measured_graphs: int = 0
    """Graphs timed by the build (0: everything came from the cache)."""
    seconds: float = 0.0

    def __post_init__(self) -> None:
        self.curve = _curve(
            [
                (self.version_tables_ms(label), ms)
                for label, ms in self.calibration.networks.items()
                if label in self.versions
            ]
        )

    @property
    def dense_ms(self) -> float:
        """The whole network with every factorized layer dense."""
        return self.calibration.dense_ms

    def layer_ms(self, name: str, ranks: tuple[int, ...]) -> tuple[str, float]:
        """(form, milliseconds of its stand-alone graph) of layer ``name``'s fastest form at ``ranks``."""
        return self.tables[name].fastest(ranks, self.forms[name])

    def standalone_ms(self, name: str, form: str, ranks: tuple[int, ...]) -> float:
        """Milliseconds of the layer's stand-alone graph in ``form`` at ``ranks`` (the table)."""
        return self.tables[name].predict(form, ranks)

    def cost_fn(self, name: str) -> Callable[[tuple[int, ...]], float]:
        """ranks → layer ``name``'s fastest form's stand-alone milliseconds, for the budget (whose
        sum :meth:`network_ms` turns into the network's)."""
        return lambda ranks: self.layer_ms(name, ranks)[1]

    def version_tables_ms(self, label: str) -> float:
        """Σ of the tables for calibration version ``label`` (each layer in that version's form)."""
        return sum(self.tables[n].predict(f, r) for n, (f, r) in self.versions[label].items())

    def network_ms(self, tables_ms: float) -> float:
        """The network's milliseconds when its layers' tables sum to ``tables_ms`` (the
        calibration curve, linear between the versions timed and beyond them)."""
        return _along(self.curve, tables_ms)

    def tables_budget(self, network_ms: float) -> float:
        """The sum of the layers' tables at which the network takes ``network_ms`` (the inverse)."""
        return _along([(w, t) for t, w in self.curve], network_ms)

    def predict(self, ranks: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
        """The network at ``ranks`` (every factorized layer): its milliseconds and fraction of
        the dense network's; per layer, the form, its stand-alone milliseconds and its share of
        the network's time (stand-alone times scaled by network / Σ tables)."""
        layers = {}
        for name in self.tables:
            form, ms = self.layer_ms(name, tuple(ranks[name]))
            layers[name] = {
                "ranks": list(ranks[name]),
                "form": form,
                "standalone_ms": ms,
                "dense_standalone_ms": self.tables[name].predict("dense", ()),
            }
        tables = sum(v["standalone_ms"] for v in layers.values())
        total = self.network_ms(tables)
        for v in layers.values():
            v["ms"] = v["standalone_ms"] * total / tables if tables > 0 else 0.0
        return {
            "ms": total,
            "dense_ms": self.dense_ms,
            "tables_ms": tables,
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
            "networks_ms": dict(self.calibration.networks),
            "networks_tables_ms": {label: self.version_tables_ms(label) for label in self.versions},
            "networks_predicted_ms": {label: self.network_ms(self.version_tables_ms(label)) for label in self.versions},
            "curve": [list(p) for p in self.curve],
            "layer_shapes": len(set(self.keys.values())),
            "measured_graphs": self.measured_graphs,
            "seconds": self.seconds,
        }


def _curve(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(Σ tables, network) points sorted by the first, the second made non-decreasing (adjacent
    violators pooled: a network version timed slower than a bigger one is noise), duplicates of
    the first merged; one point gives the line through the origin."""
    blocks: list[list[float]] = []  # [Σ x, Σ y, n] per pooled block
    for x, y in sorted(points):
        blocks.append([x, y, 1])
        while len(blocks) > 1 and blocks[-2][1] / blocks[-2][2] > blocks[-1][1] / blocks[-1][2]:
            last = blocks.pop()
            blocks[-1] = [a + b for a, b in zip(blocks[-1], last)]
    curve: list[tuple[float, float]] = []
    for sx, sy, n in blocks:
        x, y = sx / n, sy / n
        if curve and x <= curve[-1][0]:
            continue
        curve.append((x, y))
    if len(curve) == 1:
        curve.insert(0, (0.0, 0.0))
    return curve


def _along(curve: list[tuple[float, float]], x: float) -> float:
    """The piecewise-linear function through ``curve`` at ``x`` (the end segments extended),
    never below zero."""
    if len(curve) < 2:
        return max(0.0, x)
    i = 1
    while i < len(curve) - 1 and x > curve[i][0]:
        i += 1
    (x0, y0), (x1, y1) = curve[i - 1], curve[i]
    slope = (y1 - y0) / (x1 - x0) if x1 != x0 else 0.0
    return max(0.0, y0 + slope * (x - x0))


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


def middle_ranks(layer: LowRankLayer) -> tuple[int, ...]:
    """Every mode at the middle point of its two-mode grid."""
    grids = [rank_grid(int(cap), coarse=True) for cap in layer.rank_caps]
    return tuple(g[len(g) // 2] for g in grids)


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
    versions: dict[str, Version] = {"dense": {n: ("dense", tuple(layers[n].ranks)) for n in keys}}
    for label, ranks_of in (("smallest", smallest_ranks), ("middle", middle_ranks)):
        at = {n: ranks_of(layers[n]) for n in keys}
        versions[label] = {n: (tables[n].fastest(at[n], forms[n])[0], at[n]) for n in keys}
    stored = cache.load(entry)
    if stored is not None and set(stored.get("networks", {})) == set(versions):
        calibration = Calibration.from_dict(stored)
    else:
        t = time.perf_counter()
        calibration = calibrate(model, versions, settings, timer)
        measured += len(versions)
        cache.store(entry, calibration.to_dict())
        log.info(
            "latency model: the network takes %s (timed in %.1fs)",
            ", ".join(f"{v:.2f} ms {k}" for k, v in calibration.networks.items()),
            time.perf_counter() - t,
        )
    result = LatencyModel(
        settings,
        tables,
        forms,
        calibration,
        versions,
        keys,
        measured,
        time.perf_counter() - start,
    )
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


__all__ = ["LatencyModel", "build_latency_model", "middle_ranks", "set_export_forms", "smallest_ranks"]
