"""Inference cost: onnxruntime CPU latency of an exported model, multiply-adds of a PyTorch model."""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..layers import LowRankLinear, TuckerConv2d


def onnx_latency(onnx_path: str | Path, *, batch_sizes: tuple[int, ...] = (1, 32), threads: int = 2, warmup: int = 5,
                 repeats: int = 30, input_size: int, in_chans: int = 3, seed: int = 0) -> dict[int, dict[str, float]]:
    """Wall-clock time of one ``session.run`` per batch size: {batch: {median_ms, p90_ms, mean_ms, min_ms}}.

    onnxruntime CPU provider, all graph optimizations, ``threads`` intra-op threads, one
    inter-op thread, sequential execution; random inputs in [0, 1]. On a shared machine the
    median is the figure to quote; the p90 shows the noise. To compare models, time them
    together with :func:`onnx_latencies`: their runs are interleaved, so a change of the
    machine's speed reaches all of them alike.
    """
    return onnx_latencies({"model": onnx_path}, batch_sizes=batch_sizes, threads=threads, warmup=warmup,
                          repeats=repeats, input_size=input_size, in_chans=in_chans, seed=seed)["model"]


# Before each block of timed runs a model runs untimed for at least this many runs and seconds:
# right after another model (VGG16's 0.5 GB of weights through the caches) a small model's next
# runs are slower for some tens of ms (measured: 1 or 5 lead-in runs left its batch-1 median
# ~1.5× above that of a tight loop; 50 ms brought it back).
_LEAD_IN_RUNS = 3
_LEAD_IN_S = 0.05


def onnx_latencies(onnx_paths: Mapping[str, str | Path], *, batch_sizes: tuple[int, ...] = (1, 32), threads: int = 2,
                   warmup: int = 5, repeats: int = 30, input_size: int, in_chans: int = 3, seed: int = 0,
                   block: int = 10) -> dict[str, dict[int, dict[str, float]]]:
    """:func:`onnx_latency` of several models side by side: {name: {batch: stats}}.

    All sessions are loaded first; per batch size the models take turns in blocks of ``block``
    timed runs (round-robin, one model at a time) until each has ``repeats``, on the same
    input. A speed ratio between models is then measured in the same few seconds of the
    machine's time, not minutes apart (timed one model after the other, a shared machine moved
    VGG16's batch-32 speedup by 1.5× between two runs). Each block is timed in a tight loop, as
    a deployed model runs, after an untimed lead-in (see ``_LEAD_IN_S``).
    """
    import onnxruntime as ort

    for key, value in (("threads", threads), ("repeats", repeats), ("input_size", input_size), ("in_chans", in_chans),
                       ("block", block)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key} must be a positive int, got {value!r}")
    if warmup < 0 or not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise ConfigError(f"need warmup >= 0 and positive batch sizes, got warmup={warmup}, batch_sizes={batch_sizes}")
    if not onnx_paths:
        raise ConfigError("onnx_latencies needs at least one ONNX file")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    sessions = {name: _load(path, opts) for name, path in onnx_paths.items()}
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
            out[name][int(b)] = {"median_ms": statistics.median(ts), "p90_ms": ts[min(len(ts) - 1, int(0.9 * len(ts)))],
                                 "mean_ms": statistics.fmean(ts), "min_ms": ts[0], "repeats": repeats,
                                 "threads": threads}
    return out


def _lead_in(sess, feed: dict) -> None:
    runs, start = 0, time.perf_counter()
    while runs < _LEAD_IN_RUNS or time.perf_counter() - start < _LEAD_IN_S:
        sess.run(None, feed)
        runs += 1


def _load(path: str | Path, opts):
    import onnxruntime as ort

    from ..errors import WeightsError

    if not Path(path).is_file():
        raise WeightsError(f"ONNX file not found: {path}")
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime's own exception types
        raise WeightsError(f"onnxruntime cannot load {path}: {str(err).strip().splitlines()[0][:200]}") from None


def _infer_in_chans(model: nn.Module) -> int:
    mean = getattr(model, "mean", None)
    if isinstance(mean, torch.Tensor) and mean.dim() == 4:
        return int(mean.shape[1])
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
        if isinstance(m, TuckerConv2d):
            return m.in_channels
    return 3


def count_macs(model: nn.Module, input_size: int, *, in_chans: int | None = None, dense_equivalent: bool = False) -> int:
    """Multiply-adds of one image through the Conv2d/Linear/LowRankLinear/TuckerConv2d layers.

    Measured with forward hooks on a (1, C, input_size, input_size) input. TuckerConv2d counts
    its three convolutions (1×1 at the input resolution, k×k, 1×1), LowRankLinear its three
    products (x·V, ·Sᵀ, ·Uᵀ). ``dense_equivalent=True`` counts every factorized layer as the
    dense layer it replaces: the dense model's MACs without building it. Other ops (norms,
    activations, attention products) are not counted.
    """
    return sum(macs_by_layer(model, input_size, in_chans=in_chans, dense_equivalent=dense_equivalent).values())


@torch.no_grad()
def macs_by_layer(model: nn.Module, input_size: int, *, in_chans: int | None = None,
                  dense_equivalent: bool = False) -> dict[str, int]:
    """{module name: multiply-adds for one image}, by the rules of :func:`count_macs`."""
    in_chans = in_chans or _infer_in_chans(model)
    totals: dict[str, int] = {}

    def macs(module: nn.Module, x: torch.Tensor, output: torch.Tensor) -> int:
        if isinstance(module, TuckerConv2d):
            kh, kw = module.kernel_size
            out_px = output.shape[-2] * output.shape[-1]
            in_px = x.shape[-2] * x.shape[-1]
            r_out, r_in = module.ranks
            if dense_equivalent:
                return module.out_channels * module.in_channels * kh * kw * out_px
            return (module.in_channels * r_in * in_px + r_out * r_in * kh * kw * out_px
                    + module.out_channels * r_out * out_px)
        if isinstance(module, LowRankLinear):
            tokens = output.numel() // output.shape[-1]
            (r,) = module.ranks
            n_in, n_out = module.in_features, module.out_features
            return tokens * (n_in * n_out if dense_equivalent else n_in * r + r * r + r * n_out)
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            return output.numel() * (module.in_channels // module.groups) * kh * kw
        return output.numel() * module.in_features  # nn.Linear

    def hook(name: str):
        def fn(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            totals[name] = totals.get(name, 0) + macs(module, inputs[0], output) // max(1, output.shape[0])
        return fn

    kinds = (TuckerConv2d, LowRankLinear, nn.Conv2d, nn.Linear)
    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, kinds)]
    param = next(model.parameters(), None)
    was = model.training
    model.eval()
    try:
        x = torch.zeros(1, in_chans, input_size, input_size,
                        device=param.device if param is not None else None,
                        dtype=param.dtype if param is not None and param.is_floating_point() else None)
        model(x)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return {k: int(v) for k, v in totals.items()}
