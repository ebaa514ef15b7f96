"""A latency model of this machine for one factorized network (NetAdapt's and HALP's measured
lookup tables, here per export form on a grid of ranks).

:func:`build_latency_model` times, for every distinct :class:`~compressor.layers.LatencyKey`
of the network's factorized layers, each export form on its rank grid as a stand-alone graph
(:mod:`.timing`), then the whole network side by side in three versions — every factorized
layer dense, every one in its fastest form at its smallest timed ranks, and every one in its
fastest form in the middle of its grid (:mod:`.networks`). A stand-alone graph does not take
what its layer takes inside the network: it pays its own session call and layout conversions,
its timing is the fastest of a few runs, and in a network every op also waits for the
runtime's worker threads, which on a loaded machine is a large part of the time. The tables
are tied to the network by a line fitted through the three versions:

    network = rest + Σ_layers min over forms f of (κ · table_layer,f(ranks_layer) + ω · ops_f)

κ scales the tables to the network, ω is the time of one op beyond its table (``ops_f``: the
form's op count, 3 for ``tucker3``, 2 for a folded or merged form, 1 for dense), and rest is
what the factorized layers do not account for (the first conv, pooling, activations, the
classifier head). The fit is exact at the three versions; where it would make a term negative
(noise), ω = 0 and rest and κ come from the dense and smallest versions, and failing that
rest = ω = 0 and κ = dense network / Σ dense tables. A target, a fraction of the dense network,
is thus a ratio of networks timed side by side. The fastest form may be ``dense``; the export
then writes the layer dense (:func:`set_export_forms`).

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
from .timing import Timer, form_ops, layer_forms, measure_layer, time_onnx

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
    ops: dict[str, dict[str, int]] = field(default_factory=dict)
    """Layer name → form → how many ops the form has."""
    keys: dict[str, LatencyKey] = field(default_factory=dict)
    measured_graphs: int = 0
    """Graphs timed by the build (0: everything came from the cache)."""
    seconds: float = 0.0

    def __post_init__(self) -> None:
        self.rest_ms, self.kappa, self.omega, self.fit = _fit(self)

    def _ops(self, name: str, form: str) -> int:
        return self.ops.get(name, {}).get(form, 1)

    @property
    def dense_ms(self) -> float:
        """The whole network with every factorized layer dense."""
        return self.calibration.dense_ms

    def layer_ms(self, name: str, ranks: tuple[int, ...]) -> tuple[str, float]:
        """(form, milliseconds inside the network) of the fastest form of layer ``name`` at ``ranks``."""
        times = [(self.layer_form_ms(name, f, ranks), i, f) for i, f in enumerate(self.forms[name])]
        ms, _, form = min(times)
        return form, ms

    def layer_form_ms(self, name: str, form: str, ranks: tuple[int, ...]) -> float:
        """Milliseconds inside the network of layer ``name`` in ``form`` at ``ranks``."""
        return self.kappa * self.tables[name].predict(form, ranks) + self.omega * self._ops(name, form)

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

    def version_ms(self, label: str) -> float:
        """The model's time for calibration version ``label`` (each layer in that version's form)."""
        return self.rest_ms + sum(self.layer_form_ms(n, f, r) for n, (f, r) in self.versions[label].items())

    def summary(self) -> dict[str, Any]:
        return {
            "settings": self.settings.to_dict(),
            "dense_ms": self.dense_ms,
            "networks_ms": dict(self.calibration.networks),
            "networks_predicted_ms": {label: self.version_ms(label) for label in self.versions},
            "rest_ms": self.rest_ms,
            "kappa": self.kappa,
            "omega_ms": self.omega,
            "fit": self.fit,
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


def middle_ranks(layer: LowRankLayer) -> tuple[int, ...]:
    """Every mode at the middle point of its two-mode grid."""
    grids = [rank_grid(int(cap), coarse=True) for cap in layer.rank_caps]
    return tuple(g[len(g) // 2] for g in grids)


def _fit(m: LatencyModel) -> tuple[float, float, float, str]:
    """(rest, κ, ω, which fit) from the calibration versions (see the module docstring)."""
    import numpy as np

    measured = m.calibration.networks
    rows, times = [], []
    for label, version in m.versions.items():
        if label in measured and set(version) == set(m.tables):
            table = sum(m.tables[n].predict(f, r) for n, (f, r) in version.items())
            rows.append((1.0, table, float(sum(m._ops(n, f) for n, (f, _) in version.items()))))
            times.append(measured[label])
    a, w = np.array(rows), np.array(times)
    if len(rows) >= 3:
        rest, kappa, omega = np.linalg.lstsq(a, w, rcond=None)[0]
        if rest >= 0 and kappa > 0 and omega >= 0:
            return float(rest), float(kappa), float(omega), "rest, kappa, omega"
    if len(rows) >= 2:
        rest, kappa = np.linalg.lstsq(a[:2, :2], w[:2], rcond=None)[0]
        if rest >= 0 and kappa > 0:
            return float(rest), float(kappa), 0.0, "rest, kappa"
    dense = sum(t.predict("dense", ()) for t in m.tables.values())
    return 0.0, (m.calibration.dense_ms / dense if dense > 0 else 1.0), 0.0, "kappa"


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
    ops: dict[LatencyKey, dict[str, int]] = {}
    for name, key in keys.items():
        if key not in ops:
            ops[key] = {f: len(form_ops(layers[name], f)) for f in forms[name]}
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
        {name: ops[key] for name, key in keys.items()},
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
