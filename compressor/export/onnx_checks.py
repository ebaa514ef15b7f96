"""Checks of an exported ONNX graph: does it hold the factorized structure, and does it compute
what the PyTorch model computes (parity)."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, WeightsError
from ..layers import low_rank_layers
from ..runtime import ort_session
from .forms import PLAN_KEY, LayerForm, plain_model, plan_export

PARITY_TOLERANCE = 1e-4
"""Largest |ONNX − PyTorch| logit difference, relative to max |logit|, that passes parity."""
WEIGHT_BYTES_TOLERANCE = 0.05

_FLOAT_ONNX_TYPES = {1: 4, 10: 2, 11: 8, 16: 2}  # FLOAT, FLOAT16, DOUBLE, BFLOAT16 → bytes per element
_CONV_OPS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)  # each one ONNX Conv node
_OPS = (*_CONV_OPS, nn.Linear)


# ----------------------------------------------------------------------------- structure


@dataclass
class _Expectation:
    conv_calls: int
    linear_calls: int
    factor_shapes: list[tuple[int, ...]]
    weight_bytes: int
    foldable_bytes: int  # BatchNorm tensors the exporter's optimizer may fold into the preceding conv
    compressed_params: int


def _canonical(shape: tuple[int, ...]) -> tuple[int, ...]:
    # a Linear weight may be stored as (out, in) for Gemm(transB=1) or pre-transposed for MatMul
    return tuple(sorted(shape)) if len(shape) == 2 else tuple(shape)


@torch.no_grad()
def _expectation(
    model: nn.Module, plain: nn.Module, plan: dict[str, LayerForm], in_chans: int, input_size: int
) -> _Expectation:
    calls = Counter()  # op type → calls

    def hook(module, _inp, _out):
        calls[type(module)] += 1

    handles = [m.register_forward_hook(hook) for m in plain.modules() if type(m) in _OPS]
    try:
        plain(torch.zeros(1, in_chans, input_size, input_size))
    finally:
        for h in handles:
            h.remove()
    shapes = []
    for name in plan:
        shapes += [_canonical(tuple(m.weight.shape)) for m in plain.get_submodule(name).modules() if type(m) in _OPS]
    seen, nbytes = set(), 0
    for t in plain.state_dict().values():
        if t.is_floating_point() and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            nbytes += t.numel() * 4  # exported as float32
    foldable = sum(
        t.numel() * 4
        for m in plain.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for t in m.state_dict().values()
        if t.is_floating_point()
    )
    return _Expectation(
        sum(calls[t] for t in _CONV_OPS),
        calls[nn.Linear],
        shapes,
        nbytes,
        foldable,
        sum(p.numel() for p in model.parameters()),
    )


def _graph_nodes(graph) -> list:
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for attr in node.attribute:  # If/Loop/Scan bodies
            if attr.HasField("g"):
                nodes += _graph_nodes(attr.g)
            for g in attr.graphs:
                nodes += _graph_nodes(g)
    return nodes


def _proto_stats(proto) -> dict[str, Any]:
    nodes = _graph_nodes(proto.graph)
    ops = Counter(n.op_type for n in nodes)
    weights: list[tuple[tuple[int, ...], int]] = []
    for init in proto.graph.initializer:
        if init.data_type in _FLOAT_ONNX_TYPES:
            shape = tuple(int(d) for d in init.dims)
            weights.append((shape, math.prod(shape) * _FLOAT_ONNX_TYPES[init.data_type]))
    for node in nodes:  # weights the exporter kept as Constant nodes
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type in _FLOAT_ONNX_TYPES:
                    shape = tuple(int(d) for d in attr.t.dims)
                    weights.append((shape, math.prod(shape) * _FLOAT_ONNX_TYPES[attr.t.data_type]))
    return {"ops": ops, "weights": weights}


def _structure(proto, exp: _Expectation) -> dict[str, Any]:
    stats = _proto_stats(proto)
    ops = stats["ops"]
    n_conv, n_mm = ops.get("Conv", 0), ops.get("MatMul", 0) + ops.get("Gemm", 0)
    weight_bytes = sum(b for _, b in stats["weights"])
    have = Counter(_canonical(s) for s, _ in stats["weights"])
    want = Counter(exp.factor_shapes)
    missing = want - have
    param_bytes = exp.compressed_params * 4
    ratio = weight_bytes / param_bytes if param_bytes else float("nan")
    # folding BatchNorm into the conv before it removes its tensors (and may add a bias)
    low = (exp.weight_bytes - exp.foldable_bytes) * (1 - WEIGHT_BYTES_TOLERANCE)
    bytes_ok = low <= weight_bytes <= exp.weight_bytes * (1 + WEIGHT_BYTES_TOLERANCE)
    result = {
        "conv_nodes": n_conv,
        "matmul_nodes": ops.get("MatMul", 0),
        "gemm_nodes": ops.get("Gemm", 0),
        "expected_conv_nodes": exp.conv_calls,
        "expected_matmul_gemm_nodes": exp.linear_calls,
        "weight_bytes": weight_bytes,
        "expected_weight_bytes": exp.weight_bytes,
        "foldable_norm_bytes": exp.foldable_bytes,
        "batchnorm_nodes": ops.get("BatchNormalization", 0),
        "compressed_params": exp.compressed_params,
        "compressed_param_bytes": param_bytes,
        "weight_bytes_ratio": ratio,
        "weight_bytes_within_5pct": bool(abs(ratio - 1) <= WEIGHT_BYTES_TOLERANCE),
        "factors_found": sum(want.values()) - sum(missing.values()),
        "factors_expected": sum(want.values()),
        "missing_factor_shapes": [list(s) for s in sorted(missing.elements())][:10],
        "op_counts": dict(sorted(ops.items())),
    }
    # Conv nodes come only from conv modules: exact. MatMul/Gemm may also multiply two
    # activations (attention): at least one per linear call.
    result["matches"] = bool(n_conv == exp.conv_calls and n_mm >= exp.linear_calls and not missing and bytes_ok)
    return result


def _onnx_io(proto) -> tuple[int, int]:
    """(in_chans, input_size) from the graph's first input (static C, H)."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    if len(dims) != 4 or not dims[1].HasField("dim_value") or not dims[2].HasField("dim_value"):
        raise WeightsError("the ONNX model's input is not a (batch, C, H, W) tensor with static C and H")
    return int(dims[1].dim_value), int(dims[2].dim_value)


def _load_proto(path: str | Path):
    import onnx

    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"ONNX file not found: {p}")
    try:
        return onnx.load(str(p), load_external_data=False)
    except Exception as err:  # protobuf DecodeError and friends
        raise WeightsError(f"cannot read ONNX model {p} ({type(err).__name__}): corrupt or not ONNX") from None


def _stored_plan(proto, model: nn.Module) -> dict[str, LayerForm]:
    """The plan recorded in the file's metadata (export_onnx writes it), else the "auto" one."""
    meta = {p.key: p.value for p in proto.metadata_props}
    if PLAN_KEY not in meta:
        return plan_export(model, "auto")
    layers = low_rank_layers(model)
    plan = {}
    for name, form in json.loads(meta[PLAN_KEY]).items():
        layer = layers.get(name)
        if layer is None or not layer.forms:
            raise WeightsError(f"the ONNX model was exported from another model: no factorized layer {name!r} here")
        costs = layer.costs()
        if form not in costs:
            raise WeightsError(f"the ONNX model's metadata names an unknown form {form!r} for layer {name!r}")
        plan[name] = LayerForm(layer.kind, form, *costs[form])
    return plan


def structure_check(onnx_path: str | Path, model: nn.Module) -> dict[str, Any]:
    """Does the ONNX graph hold ``model``'s factorized structure?

    Counts Conv/MatMul/Gemm nodes and float initializer bytes and compares them with the
    exported form of ``model`` (the plan stored in the file's metadata): Conv nodes == conv
    calls, MatMul+Gemm ≥ linear calls, every factor present as its own initializer (same
    shape), weight bytes within 5% of the expected ones (less any BatchNorm tensors the
    exporter folded into convs). ``weight_bytes_ratio`` is weight bytes / (compressed
    parameters × 4): about 1 when nothing was folded back into dense (below 1 by the folded
    BatchNorms and merged cores; far above 1 if factors were multiplied back together).
    """
    proto = _load_proto(onnx_path)
    in_chans, size = _onnx_io(proto)
    plan = _stored_plan(proto, model)
    was = model.training
    try:
        plain = plain_model(model, plan)
        result = _structure(proto, _expectation(model, plain, plan, in_chans, size))
    finally:
        model.train(was)
    result["plan"] = {n: f.form for n, f in plan.items()}
    return result


# ----------------------------------------------------------------------------- parity


@torch.no_grad()
def parity_check(
    onnx_path: str | Path,
    model: nn.Module,
    input_size: int | None = None,
    batches: tuple[int, ...] = (1, 8),
    seed: int = 0,
) -> dict[str, Any]:
    """Run the same random images (uniform in [0,1]) through onnxruntime and ``model``.

    Reports per batch size the max |ONNX − PyTorch| logit difference and that relative to
    max |logit|; passes if the relative difference is ≤ 1e-4 at every batch size.
    """
    sess = ort_session(onnx_path, threads=1)
    inp = sess.get_inputs()[0]
    in_chans, onnx_size = inp.shape[1], inp.shape[2]
    size = input_size or onnx_size
    if isinstance(onnx_size, int) and size != onnx_size:
        raise ConfigError(f"input_size {size} differs from the ONNX model's input {onnx_size}")
    gen = torch.Generator().manual_seed(seed)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    was = model.training
    model.eval()
    out: dict[str, Any] = {"batches": {}, "tolerance": PARITY_TOLERANCE}
    try:
        for b in batches:
            x = torch.rand(b, in_chans, size, size, generator=gen)
            ref = model(x.to(device, dtype)).float().cpu()
            got = torch.from_numpy(sess.run(None, {inp.name: x.numpy()})[0]).float()
            if got.shape != ref.shape:
                raise WeightsError(
                    f"ONNX output shape {tuple(got.shape)} differs from PyTorch's {tuple(ref.shape)} at batch {b}"
                )
            diff = float((got - ref).abs().max())
            scale = float(ref.abs().max())
            out["batches"][b] = {
                "max_abs_diff": diff,
                "max_abs_logit": scale,
                "rel_diff": diff / max(scale, 1e-12),
                "argmax_agreement": float((got.argmax(1) == ref.argmax(1)).float().mean()),
            }
    finally:
        model.train(was)
    per = out["batches"].values()
    out["max_abs_diff"] = max(v["max_abs_diff"] for v in per)
    out["max_abs_logit"] = max(v["max_abs_logit"] for v in per)
    out["rel_diff"] = max(v["rel_diff"] for v in per)
    out["passed"] = bool(out["rel_diff"] <= PARITY_TOLERANCE)
    return out
