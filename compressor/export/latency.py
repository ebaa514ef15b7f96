"""onnxruntime CPU latency of exported models, timed side by side."""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..recipe import ExportSection
from ..runtime import ort_session

LATENCY_BATCH_SIZES: tuple[int, ...] = (1, 32)
"""The batch sizes a model is timed at: one image (an edge device's request) and a batch."""


def onnx_latency(
    onnx_path: str | Path,
    *,
    batch_sizes: tuple[int, ...] = LATENCY_BATCH_SIZES,
    threads: int | None = None,
    warmup: int = 5,
    repeats: int | None = None,
    input_size: int,
    in_chans: int = 3,
    seed: int = 0,
) -> dict[int, dict[str, float]]:
    """Wall-clock time of one ``session.run`` per batch size: {batch: {median_ms, p90_ms, mean_ms, min_ms}}.

    onnxruntime CPU provider, all graph optimizations, ``threads`` intra-op threads, one
    inter-op thread, sequential execution; random inputs in [0, 1]. ``threads`` and ``repeats``
    default to the recipe's ``export.latency_threads`` and ``export.latency_repeats``. On a
    shared machine the median is the figure to quote; the p90 shows the noise. To compare models, time them
    together with :func:`onnx_latencies`: their runs are interleaved, so a change of the
    machine's speed reaches all of them alike.
    """
    return onnx_latencies(
        {"model": onnx_path},
        batch_sizes=batch_sizes,
        threads=threads,
        warmup=warmup,
        repeats=repeats,
        input_size=input_size,
        in_chans=in_chans,
        seed=seed,
    )["model"]


# Before each block of timed runs a model runs untimed for at least this many runs and seconds:
# right after another model has streamed its weights through the caches, a small model's first
# runs are slower than in a tight loop, and a deployed model runs in a tight loop.
_LEAD_IN_RUNS = 3
_LEAD_IN_S = 0.05


def onnx_latencies(
    onnx_paths: Mapping[str, str | Path],
    *,
    batch_sizes: tuple[int, ...] = LATENCY_BATCH_SIZES,
    threads: int | None = None,
    warmup: int = 5,
    repeats: int | None = None,
    input_size: int,
    in_chans: int = 3,
    seed: int = 0,
    block: int = 10,
) -> dict[str, dict[int, dict[str, float]]]:
    """:func:`onnx_latency` of several models side by side: {name: {batch: stats}}.

    All sessions are loaded first; per batch size the models take turns in blocks of ``block``
    timed runs (round-robin, one model at a time) until each has ``repeats``, on the same
    input. A speed ratio between models is then measured in the same few seconds of the
    machine's time, not minutes apart, so that a change in the machine's load reaches all of
    them alike. Each block is timed in a tight loop, as
    a deployed model runs, after an untimed lead-in (see ``_LEAD_IN_S``).
    """
    defaults = ExportSection()
    threads = defaults.latency_threads if threads is None else threads
    repeats = defaults.latency_repeats if repeats is None else repeats
    for key, value in (
        ("threads", threads),
        ("repeats", repeats),
        ("input_size", input_size),
        ("in_chans", in_chans),
        ("block", block),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key} must be a positive int, got {value!r}")
    if warmup < 0 or not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise ConfigError(f"need warmup >= 0 and positive batch sizes, got warmup={warmup}, batch_sizes={batch_sizes}")
    if not onnx_paths:
        raise ConfigError("onnx_latencies needs at least one ONNX file")
    sessions = {name: ort_session(path, threads=threads) for name, path in onnx_paths.items()}
    inputs = {name: sess.get_inputs()[0].name for name, sess in sessions.items()}
    rng = np.random.default_rng(seed)
    interleaved = len(sessions) > 1
    out: dict[str, dict[int, dict[str, float]]] = {name: {} for name in sessions}
    for b in batch_sizes:
        x = rng.random((int(b), in_chans, input_size, input_size), dtype=np.float32)
        for name, sess in sessions.items():
            for _ in range(warmup):
                sess.run(None, {inputs[name]: x})
        times: dict[str, list[float]] = {name: [] for name in sessions}
        while any(len(t) < repeats for t in times.values()):
            for name, sess in sessions.items():
                feed = {inputs[name]: x}
                if interleaved:
                    _lead_in(sess, feed)
                for _ in range(min(block, repeats - len(times[name]))):
                    t = time.perf_counter()
                    sess.run(None, feed)
                    times[name].append((time.perf_counter() - t) * 1e3)
        for name, ts in times.items():
            ts.sort()
            out[name][int(b)] = {
                "median_ms": statistics.median(ts),
                "p90_ms": ts[min(len(ts) - 1, int(0.9 * len(ts)))],
                "mean_ms": statistics.fmean(ts),
                "min_ms": ts[0],
                "repeats": repeats,
                "threads": threads,
            }
    return out


def _lead_in(sess, feed: dict) -> None:
    runs, start = 0, time.perf_counter()
    while runs < _LEAD_IN_RUNS or time.perf_counter() - start < _LEAD_IN_S:
        sess.run(None, feed)
        runs += 1
