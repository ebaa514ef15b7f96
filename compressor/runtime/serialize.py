"""JSON documents and onnxruntime sessions, built one way for every stage."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from ..errors import WeightsError


def jsonable(obj: Any) -> Any:
    """Plain JSON types: NaN/±Inf become null, tensors and NumPy scalars their values, dataclasses
    and objects with ``to_dict()`` their dicts, anything else its ``str``."""
    if hasattr(obj, "to_dict"):
        return jsonable(obj.to_dict())
    if is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "item") and getattr(obj, "ndim", 0) == 0:  # a 0-d tensor or NumPy scalar
        return jsonable(obj.item())
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def dumps(doc: Any) -> str:
    """``doc`` as indented JSON (see :func:`jsonable`), newline-terminated."""
    return json.dumps(jsonable(doc), indent=2, allow_nan=False) + "\n"


def ort_session(path: str | Path, *, threads: int | None = None, optimize: bool = True):
    """An onnxruntime CPU session for ``path``.

    ``threads``: intra-op threads (None: onnxruntime's default) with one inter-op thread and
    sequential execution, as a deployed model runs. A missing or unloadable file raises
    WeightsError with onnxruntime's first line.
    """
    import onnxruntime as ort

    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"ONNX file not found: {p}")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(p), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime's own exception types
        raise WeightsError(f"onnxruntime cannot load {p}: {str(err).strip().splitlines()[0][:200]}") from None
