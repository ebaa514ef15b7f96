"""Timing a layer's export forms with onnxruntime on a grid of ranks.

For every form a layer can be exported in, the rank modes it depends on are found by asking
the layer for the form's ops at two ranks (:func:`form_modes`); the form is then timed at
every point of :func:`~compressor.latency.table.rank_grid` on those modes (one mode: the
multiples of 8 and the cap; two: the coarse grid on each, bilinear in between), as a
stand-alone graph (:mod:`.graphs`) in a session opened as the export's latency check opens
it (:func:`compressor.runtime.ort_session`: ``threads`` intra-op threads, one inter-op thread,
sequential, all graph optimizations). A form whose ops at two grid points are the same (a cap
reached on both) is timed once. The table keeps the lower envelope of the timings
(:func:`~.table.lower_envelope`): on a shared machine a timing is only ever too slow.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..layers import LowRankLayer
from .graphs import form_graph, op_shapes
from .settings import LatencySettings
from .table import FormTable, LayerTable, lower_envelope, rank_grid

Timer = Callable[[Sequence[tuple[Path, tuple[int, ...]]], int], list[float]]
"""([(ONNX file, input shape), ...], intra-op threads) → milliseconds of one run of each."""

# A table has hundreds of graphs; each is timed until it has MIN_RUNS runs and MIN_SECONDS of
# them, at most MAX_RUNS (after WARMUP untimed runs), and their median counts: inside a network
# every op pays what a typical run pays — on a loaded machine, chiefly the wait for the
# runtime's worker threads, which the fastest of a few runs leaves out (a model built on those
# predicted VGG16 faster than it ran). Bursts are the lower envelope's part (.table).
WARMUP, MIN_RUNS, MAX_RUNS, MIN_SECONDS = 1, 4, 9, 0.05
ROUNDS = 5
"""Rounds of several graphs timed side by side (a lead-in and one timed run each per round)."""
LEAD_IN_S = 0.05
"""Before each timed run of several graphs, the graph runs untimed for this long: every open
session's worker threads spin for a while after their run, and a graph timed right after many
others would share the cores with all of them."""


def time_onnx(graphs: Sequence[tuple[Path, tuple[int, ...]]], threads: int) -> list[float]:
    """Milliseconds of one ``session.run`` of each graph on random inputs, the median of its timed
    runs. One graph runs in a tight loop; several (whole networks) take turns
    (:data:`ROUNDS`), so that a change of the machine's load between them reaches all alike,
    each timed run after an untimed lead-in (:data:`LEAD_IN_S`; its weights back in the caches,
    the other sessions' threads idle again)."""
    from ..runtime import ort_session

    rng = np.random.default_rng(0)
    runs = []
    for path, shape in graphs:
        sess = ort_session(path, threads=threads)
        feed = {sess.get_inputs()[0].name: rng.random(shape, dtype=np.float32)}
        for _ in range(WARMUP):
            sess.run(None, feed)
        runs.append((sess, feed))
    times: list[list[float]] = [[] for _ in runs]
    if len(runs) == 1:
        sess, feed = runs[0]
        start = time.perf_counter()
        while len(times[0]) < MAX_RUNS and (len(times[0]) < MIN_RUNS or time.perf_counter() - start < MIN_SECONDS):
            t = time.perf_counter()
            sess.run(None, feed)
            times[0].append((time.perf_counter() - t) * 1e3)
    else:
        for _ in range(ROUNDS):
            for (sess, feed), ts in zip(runs, times):
                start = time.perf_counter()
                sess.run(None, feed)
                while time.perf_counter() - start < LEAD_IN_S:
                    sess.run(None, feed)
                t = time.perf_counter()
                sess.run(None, feed)
                ts.append((time.perf_counter() - t) * 1e3)
    return [statistics.median(ts) for ts in times]


def _ops_at(layer: LowRankLayer, form: str, ranks: Sequence[int]) -> tuple:
    """The ops of ``form`` with the layer at ``ranks`` (``layer`` lives on the meta device: only
    shapes are computed)."""
    layer.set_ranks_(tuple(int(r) for r in ranks))
    with torch.device("meta"):
        module = layer.export_module(form)
    return tuple((k, s, b, tuple(sorted(a.items()))) for k, s, b, a in op_shapes(module))


def form_modes(layer: LowRankLayer, form: str) -> tuple[int, ...]:
    """The rank modes ``form``'s ops depend on (``layer``: a meta-device copy)."""
    caps = tuple(layer.rank_caps)
    at_caps = _ops_at(layer, form, caps)
    modes = []
    for m, cap in enumerate(caps):
        if cap > 1:
            lower = list(caps)
            lower[m] = cap - 1
            if _ops_at(layer, form, lower) != at_caps:
                modes.append(m)
    return tuple(modes)


def layer_forms(layer: LowRankLayer) -> tuple[str, ...]:
    """The forms a layer's table holds: those the export chooses among, and dense."""
    forms = tuple(layer.export_forms) or (layer.trained_form,)
    return forms if "dense" in forms else (*forms, "dense")


def write_form_graph(
    ops: Sequence[tuple],
    path: Path,
    shape: tuple[int, ...],
    settings: LatencySettings,
    graph: Callable[..., Any] = form_graph,
) -> Path:
    """Write the graph of ``ops`` (:func:`~.graphs.op_shapes`) for ``settings``' precision."""
    proto = graph(list(ops), shape)
    if settings.precision == "int8":
        from .quantized import quantize_graph

        proto = quantize_graph(proto, shape)
    path.write_bytes(proto.SerializeToString())
    return path


def form_ops(layer: LowRankLayer, form: str, ranks: Sequence[int] | None = None) -> list:
    """The ops of ``layer``'s ``form`` at ``ranks`` (default: its own), shapes only."""
    meta = copy.deepcopy(layer).to("meta")
    return [(k, s, b, dict(a)) for k, s, b, a in _ops_at(meta, form, ranks if ranks is not None else meta.ranks)]


def _grid_values(
    time_at: Callable[[list[int]], float], modes: Sequence[int], axes: Sequence[Sequence[int]], ranks: list[int]
) -> Any:
    """Nested lists of ``time_at`` over the grid ``axes`` of ``modes`` (the other modes as in ``ranks``)."""
    if not modes:
        return time_at(ranks)
    out = []
    for r in axes[0]:
        at = list(ranks)
        at[modes[0]] = r
        out.append(_grid_values(time_at, modes[1:], axes[1:], at))
    return out


def measure_layer(
    layer: LowRankLayer,
    input_shape: Sequence[int],
    settings: LatencySettings,
    *,
    timer: Timer = time_onnx,
    folder: Path | None = None,
    graph: Callable[..., Any] = form_graph,
) -> tuple[LayerTable, int]:
    """The table of every form of ``layer`` (input of ``input_shape``, batch first, timed at
    ``settings.batch``) and how many graphs were timed."""
    meta = copy.deepcopy(layer).to("meta")
    shape = (settings.batch, *[int(d) for d in input_shape[1:]])
    caps = tuple(int(c) for c in meta.rank_caps)
    timed: dict[tuple, float] = {}
    with tempfile.TemporaryDirectory(prefix="latency-", dir=folder) as tmp:

        def ms(ops: tuple) -> float:
            if ops not in timed:
                path = Path(tmp) / f"g{len(timed)}.onnx"
                write_form_graph([(k, s, b, dict(a)) for k, s, b, a in ops], path, shape, settings, graph)
                timed[ops] = timer([(path, shape)], settings.threads)[0]
                path.unlink()
            return timed[ops]

        tables = {}
        for form in layer_forms(meta):
            modes = form_modes(meta, form)
            axes = tuple(rank_grid(caps[m], coarse=len(modes) > 1) for m in modes)
            values = _grid_values(lambda ranks, form=form: ms(_ops_at(meta, form, ranks)), modes, axes, list(caps))
            tables[form] = FormTable(modes, axes, lower_envelope(values))
    return LayerTable(tables), len(timed)


__all__ = ["Timer", "form_modes", "form_ops", "layer_forms", "measure_layer", "time_onnx", "write_form_graph"]
