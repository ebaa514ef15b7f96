"""ONNX export of factorized models as plain Conv/MatMul/Gemm graphs, with structure and parity checks.

Before export every factorized layer is rewritten into ordinary ``nn.Conv2d``/``nn.Linear``
modules holding its factors (:func:`plan_export` decides the form, :func:`plain_model` builds
it), so any runtime runs the graph and the exporter cannot fold the factors back into a dense
weight: each factor is consumed by an op whose other input is an activation.

Forms (``fold="auto"``: among the forms with no more weights than the factorized layer, the one
with the fewest multiply-adds; ties keep the more factored form):

- LowRankLinear, W = U S Vᵀ: ``merged`` — x → x·(V Sᵀ) → ·Uᵀ + b, two MatMul/Gemm. S folded into
  the first factor: r² fewer weights and MACs than three products, same result up to float
  rounding (a re-association). ``dense`` when in·out ≤ (in+out)·r (rank near full).
- TuckerConv2d: ``tucker3`` — Conv 1×1 (C_in→r_in), Conv k×k (r_in→r_out, original stride/
  padding/dilation), Conv 1×1 (r_out→C_out, bias). ``fold_out`` (core·U_out: one k×k conv
  r_in→C_out), ``fold_in`` (U_in folded into a strided k×k conv C_in→r_out) or ``dense`` when one
  of them is cheaper — which needs a rank near its channel count.

``fold="none"`` keeps every factor as its own op (three per layer), for comparison.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import math
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..atomic import atomic_path
from ..errors import ConfigError, OutputError, WeightsError
from ..layers import LowRankLayer, LowRankLinear, TuckerConv2d, low_rank_layers
from ..runtime import ort_session
from ..runtime.costs import CONV_FORMS, layer_costs

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
PLAN_KEY = "compressor.export_plan"
PARITY_TOLERANCE = 1e-4
"""Largest |ONNX − PyTorch| logit difference, relative to max |logit|, that passes parity."""
WEIGHT_BYTES_TOLERANCE = 0.05

_TWO_GB = 2**31 - 1
_FLOAT_ONNX_TYPES = {1: 4, 10: 2, 11: 8, 16: 2}  # FLOAT, FLOAT16, DOUBLE, BFLOAT16 → bytes per element
_FORMS = {"linear": ("merged", "dense"), "conv": CONV_FORMS}


# ----------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class LayerForm:
    """How one factorized layer is written into the graph."""

    kind: str  # "linear" | "conv"
    form: str  # "unmerged" | "merged" | "tucker3" | "fold_out" | "fold_in" | "dense"
    params: int  # weights of this form (bias included)
    macs: int  # multiply-adds per output token/pixel


def plan_export(model: nn.Module, fold: str = "auto", *, called: set[str] | None = None) -> dict[str, LayerForm]:
    """Layer name → the form it is exported in (see the module docstring). ``called``: the
    layers the model's forward calls (:func:`called_layers`); the others are read through their
    ``.weight`` by their parent and are written dense, as the parent uses them."""
    if fold not in ("auto", "none"):
        raise ConfigError(f"fold must be 'auto' or 'none', got {fold!r}")
    plan = {}
    for name, layer in low_rank_layers(model).items():
        if called is not None and name not in called:
            costs = layer_costs(layer)
            plan[name] = LayerForm("linear" if isinstance(layer, LowRankLinear) else "conv", "dense", *costs["dense"])
            continue
        if isinstance(layer, LowRankLinear):
            kind, costs, base = "linear", layer_costs(layer), "unmerged"
        elif isinstance(layer, TuckerConv2d):
            kind, costs, base = "conv", layer_costs(layer), "tucker3"
        else:  # a LowRankLayer subclass this exporter does not know: export its own forward
            continue
        if fold == "none":
            choice = base
        else:
            limit = costs[base][0]
            allowed = [f for f in _FORMS[kind] if costs[f][0] <= limit]
            choice = min(allowed, key=lambda f: costs[f][1])  # min keeps the first of equals
        plan[name] = LayerForm(kind, choice, *costs[choice])
    return plan


@torch.no_grad()
def called_layers(model: nn.Module, example: Tensor) -> set[str]:
    """Names of the factorized layers that ``model``'s forward calls on ``example`` (a layer read
    only through ``.weight`` is not called)."""
    seen: set[str] = set()
    handles = [
        layer.register_forward_hook(lambda m, i, o, name=name: seen.add(name))
        for name, layer in low_rank_layers(model).items()
    ]
    was = model.training
    param = next(model.parameters(), None)
    try:
        model.eval()
        model(example.to(param.device, param.dtype) if param is not None else example)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return seen


def _lin(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    m = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        m.weight.copy_(weight)
        if bias is not None:
            m.bias.copy_(bias)
    return m


def _conv(weight: Tensor, bias: Tensor | None, **kw: Any) -> nn.Conv2d:
    m = nn.Conv2d(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), bias=bias is not None, **kw)
    with torch.no_grad():
        m.weight.copy_(weight)
        if bias is not None:
            m.bias.copy_(bias)
    return m


@torch.no_grad()
def _plain_layer(layer: LowRankLayer, form: str) -> nn.Module:
    """Plain float32 modules computing ``layer`` in ``form`` (products formed in float64)."""
    f32 = torch.float32
    bias = layer.bias.detach().to(f32) if layer.bias is not None else None
    if isinstance(layer, LowRankLinear):
        u, s, v = (t.detach().double() for t in (layer.U, layer.S, layer.V))
        if form == "unmerged":
            return nn.Sequential(_lin(v.mT.to(f32), None), _lin(s.to(f32), None), _lin(u.to(f32), bias))
        if form == "merged":  # x·V·Sᵀ·Uᵀ = x·(S Vᵀ)ᵀ·Uᵀ
            return nn.Sequential(_lin((s @ v.mT).to(f32), None), _lin(u.to(f32), bias))
        return _lin((u @ s @ v.mT).to(f32), bias)
    assert isinstance(layer, TuckerConv2d)
    u_out, core, u_in = (t.detach().double() for t in (layer.U_out, layer.C, layer.U_in))
    spatial = {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation}
    first = u_in.mT[:, :, None, None].to(f32)  # r_in × C_in × 1 × 1
    last = u_out[:, :, None, None].to(f32)  # C_out × r_out × 1 × 1
    if form == "tucker3":
        return nn.Sequential(_conv(first, None), _conv(core.to(f32), None, **spatial), _conv(last, bias))
    if form == "fold_out":
        return nn.Sequential(
            _conv(first, None), _conv(torch.einsum("oa,aihw->oihw", u_out, core).to(f32), bias, **spatial)
        )
    if form == "fold_in":
        return nn.Sequential(
            _conv(torch.einsum("abhw,cb->achw", core, u_in).to(f32), None, **spatial), _conv(last, bias)
        )
    return _conv(torch.einsum("oa,abhw,cb->ochw", u_out, core, u_in).to(f32), bias, **spatial)


def plain_model(model: nn.Module, plan: dict[str, LayerForm]) -> nn.Module:
    """A float32 CPU copy of ``model`` in eval mode with the planned layers made plain.

    Tensors outside the rewritten layers are shared with ``model`` (no copy) when it is
    already float32 on the CPU.
    """
    tensors = list(model.parameters()) + list(model.buffers())
    if all(t.device.type == "cpu" and (not t.is_floating_point() or t.dtype == torch.float32) for t in tensors):
        memo = {id(t): t for t in tensors}
        plain = copy.deepcopy(model, memo)
    else:
        plain = copy.deepcopy(model).to("cpu", torch.float32)
    layers = low_rank_layers(plain)
    for name, form in plan.items():
        parent, _, child = name.rpartition(".")
        new = _plain_layer(layers[name], form.form)
        setattr(plain.get_submodule(parent) if parent else plain, child, new)
    return plain.eval()


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
    calls = Counter()

    def hook(module, _inp, _out):
        calls["conv" if isinstance(module, nn.Conv2d) else "linear"] += 1

    handles = [m.register_forward_hook(hook) for m in plain.modules() if type(m) in (nn.Conv2d, nn.Linear)]
    try:
        plain(torch.zeros(1, in_chans, input_size, input_size))
    finally:
        for h in handles:
            h.remove()
    shapes = []
    for name in plan:
        shapes += [
            _canonical(tuple(m.weight.shape))
            for m in plain.get_submodule(name).modules()
            if type(m) in (nn.Conv2d, nn.Linear)
        ]
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
        calls["conv"], calls["linear"], shapes, nbytes, foldable, sum(p.numel() for p in model.parameters())
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
        if not isinstance(layer, (LowRankLinear, TuckerConv2d)):
            raise WeightsError(f"the ONNX model was exported from another model: no factorized layer {name!r} here")
        kind, costs = ("linear" if isinstance(layer, LowRankLinear) else "conv"), layer_costs(layer)
        if form not in costs:
            raise WeightsError(f"the ONNX model's metadata names an unknown form {form!r} for layer {name!r}")
        plan[name] = LayerForm(kind, form, *costs[form])
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


# ----------------------------------------------------------------------------- export


@dataclass
class OnnxExportInfo:
    """What :func:`export_onnx` wrote and how."""

    path: str
    exporter: str  # "dynamo" | "legacy"
    opset: int
    dynamic_batch: bool
    input_name: str
    output_name: str
    input_shape: list[int | str]
    size_bytes: int
    seconds: float
    plan: dict[str, str]
    structure: dict[str, Any]
    fallback_reason: str | None = None
    simplified: bool = False
    simplify_note: str | None = None

    @property
    def weight_bytes(self) -> int:
        return self.structure["weight_bytes"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300]}" if text else type(err).__name__


def _export_dynamo(plain: nn.Module, example: Tensor, opset: int, dynamic_batch: bool):
    dyn = ({0: torch.export.Dim("batch", min=1, max=1 << 20)},) if dynamic_batch else None
    with tempfile.TemporaryDirectory() as artifacts, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            plain,
            (example,),
            None,
            dynamo=True,
            verbose=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamic_shapes=dyn,
            optimize=True,
            artifacts_dir=artifacts,
        )
    return program.model_proto


def _export_legacy(plain: nn.Module, example: Tensor, opset: int, dynamic_batch: bool):
    import onnx

    buf = io.BytesIO()
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            plain,
            (example,),
            buf,
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamic_axes=axes,
            do_constant_folding=True,
        )
    return onnx.load_from_string(buf.getvalue())


def _try_simplify(proto, exp: _Expectation) -> tuple[Any, bool, str]:
    try:
        import onnxslim
    except ImportError:
        return proto, False, "onnxslim not installed"
    try:
        slim = onnxslim.slim(copy.deepcopy(proto))
    except Exception as err:  # optional tool: never fail the export over it
        return proto, False, f"onnxslim failed ({_short(err)})"
    if slim is None or not _structure(slim, exp)["matches"]:
        return proto, False, "onnxslim's graph lost the factorized structure: kept the exporter's"
    return slim, True, "onnxslim applied"


def _write(proto, path: Path) -> int:
    import onnx

    if proto.ByteSize() < _TWO_GB:
        with atomic_path(path) as tmp:
            tmp.write_bytes(proto.SerializeToString())
        return path.stat().st_size
    # over protobuf's 2 GB limit: weights go to <name>.data beside the graph
    with atomic_path(path) as tmp:
        onnx.save_model(
            proto,
            str(tmp),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
            size_threshold=1024,
        )
    return path.stat().st_size + (path.parent / (path.name + ".data")).stat().st_size


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    input_size: int,
    in_chans: int = 3,
    opset: int = 18,
    dynamic_batch: bool = True,
    fold: str = "auto",
    simplify: bool = True,
    check: bool = True,
    metadata: Mapping[str, str] | None = None,
) -> OnnxExportInfo:
    """Export ``model`` (images in [0,1] → logits) to ONNX at ``path``, written atomically.

    Factorized layers become plain Conv/MatMul/Gemm ops in the form chosen by
    :func:`plan_export` (``fold``); the graph is checked with ``onnx.checker`` and against the
    factorized structure (:func:`structure_check`; recorded in ``.structure``). Uses the dynamo
    exporter (the TorchScript one cannot export e.g. VGG's adaptive pooling at 32×32); falls
    back to the legacy exporter only if dynamo fails, recording why. The batch axis is
    dynamic unless ``dynamic_batch=False``. With ``simplify`` and onnxslim installed, the
    simplified graph is kept only if the structure check still holds. ``check=False`` skips
    ``onnx.checker`` (for a throwaway graph that is only timed; the structure check still runs).
    ``metadata``: extra ``metadata_props`` entries (e.g. the deployment document).
    """
    import onnx

    for key, value in (("input_size", input_size), ("in_chans", in_chans), ("opset", opset)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key} must be a positive int, got {value!r}")
    if opset < 17:
        raise ConfigError(f"opset {opset} is too old: use 17 or newer (default 18)")
    path = Path(path)
    start = time.perf_counter()
    example = torch.rand(
        2 if dynamic_batch else 1, in_chans, input_size, input_size, generator=torch.Generator().manual_seed(0)
    )
    plan = plan_export(model, fold, called=called_layers(model, example))
    was = model.training
    try:
        plain = plain_model(model, plan)
        exp = _expectation(model, plain, plan, in_chans, input_size)
        exporter, reason = "dynamo", None
        try:
            proto = _export_dynamo(plain, example, opset, dynamic_batch)
        except Exception as err:  # the dynamo exporter raises many types; the legacy one may still work
            reason = _short(err)
            log.warning("dynamo ONNX export failed (%s); trying the legacy TorchScript exporter", reason)
            exporter = "legacy"
            try:
                proto = _export_legacy(plain, example, opset, dynamic_batch)
            except Exception as err2:
                raise OutputError(
                    f"ONNX export failed with both exporters: dynamo: {reason}; legacy: {_short(err2)}"
                ) from None
    finally:
        model.train(was)

    simplified, note = False, None
    if simplify:
        proto, simplified, note = _try_simplify(proto, exp)
    plan_forms = {n: f.form for n, f in plan.items()}
    meta = {p.key: p for p in proto.metadata_props}
    props = {PLAN_KEY: json.dumps(plan_forms, sort_keys=True), "compressor.exporter": exporter, **(metadata or {})}
    for key, value in props.items():
        entry = meta.get(key) or proto.metadata_props.add()
        entry.key, entry.value = key, value
    if check and proto.ByteSize() < _TWO_GB:
        try:
            onnx.checker.check_model(proto)
        except onnx.checker.ValidationError as err:
            raise OutputError(f"the exported ONNX model fails onnx.checker: {_short(err)}") from None
    structure = _structure(proto, exp)
    if not structure["matches"]:
        log.warning(
            "ONNX graph does not match the factorized structure: %s",
            {
                k: structure[k]
                for k in (
                    "conv_nodes",
                    "expected_conv_nodes",
                    "matmul_nodes",
                    "gemm_nodes",
                    "expected_matmul_gemm_nodes",
                    "weight_bytes",
                    "expected_weight_bytes",
                    "missing_factor_shapes",
                )
            },
        )
    size_bytes = _write(proto, path)
    if check and proto.ByteSize() >= _TWO_GB:
        onnx.checker.check_model(str(path))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    shape = [d.dim_param if d.HasField("dim_param") else int(d.dim_value) for d in dims]
    structure["plan"] = plan_forms
    info = OnnxExportInfo(
        path=str(path),
        exporter=exporter,
        opset=opset,
        dynamic_batch=dynamic_batch,
        input_name=proto.graph.input[0].name,
        output_name=proto.graph.output[0].name,
        input_shape=shape,
        size_bytes=size_bytes,
        seconds=time.perf_counter() - start,
        plan=plan_forms,
        structure=structure,
        fallback_reason=reason,
        simplified=simplified,
        simplify_note=note,
    )
    log.info(
        "exported %s with the %s exporter in %.1fs (%d Conv, %d MatMul/Gemm, %.2f MB weights)",
        path,
        exporter,
        info.seconds,
        structure["conv_nodes"],
        structure["matmul_nodes"] + structure["gemm_nodes"],
        structure["weight_bytes"] / 1e6,
    )
    return info
