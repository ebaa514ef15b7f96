"""ONNX export of factorized models as plain Conv/MatMul/Gemm graphs.

The factorized layers are first rewritten into plain modules in the forms :mod:`.forms` plans;
the written graph is checked against that structure (:mod:`.onnx_checks`, which also holds the
parity check).
"""

from __future__ import annotations

import copy
import io
import json
import logging
import tempfile
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..atomic import atomic_path
from ..errors import ConfigError, OutputError
from .forms import PLAN_KEY, LayerForm, called_layers, plain_model, plan_export
from .onnx_checks import PARITY_TOLERANCE, _Expectation, _expectation, _structure, parity_check, structure_check

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"

_TWO_GB = 2**31 - 1


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


__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "PARITY_TOLERANCE",
    "PLAN_KEY",
    "LayerForm",
    "OnnxExportInfo",
    "called_layers",
    "export_onnx",
    "parity_check",
    "plain_model",
    "plan_export",
    "structure_check",
]
