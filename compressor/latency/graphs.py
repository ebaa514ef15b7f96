"""One layer's export form as a stand-alone ONNX graph, for timing.

A form's plain modules (``LowRankLayer.export_module``: ``nn.Conv2d`` / ``nn.Linear``, in an
``nn.Sequential``) are written op for op as the exporter writes them (Conv; Gemm for a 2-D
input, MatMul + Add otherwise), with random weights of the same shapes: onnxruntime's CPU
kernels take as long for any values, and building the graph directly takes milliseconds
where the exporter takes seconds, which a grid of hundreds of graphs cannot afford.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import nn

from ..errors import ConfigError

OPSET = 18
"""The opset of the timed graphs (the export's default)."""

_INPUT, _OUTPUT = "input", "output"


def plain_ops(module: nn.Module) -> list[nn.Module]:
    """The Conv2d / Linear ops of a form's plain modules, in order (raises ConfigError for any
    other module: such a layer cannot be timed here)."""
    if isinstance(module, nn.Sequential):
        return [op for child in module for op in plain_ops(child)]
    if isinstance(module, nn.Identity):
        return []
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        return [module]
    raise ConfigError(
        f"the latency model times export forms made of Conv2d and Linear ops; a {type(module).__name__} "
        "is not one (give this model a params or macs target instead)"
    )


def op_shapes(module: nn.Module) -> list[tuple[str, tuple[int, ...], bool, dict[str, Any]]]:
    """(ONNX op — Conv or Gemm —, weight shape, has bias, conv attributes) per op: all that a timed graph needs,
    and what decides whether two forms at two ranks are the same graph."""
    out = []
    for op in plain_ops(module):
        if isinstance(op, nn.Conv2d):
            if op.padding_mode != "zeros" or isinstance(op.padding, str):
                raise ConfigError(f"cannot time a conv with padding {op.padding!r} / {op.padding_mode!r}")
            attrs = {"stride": op.stride, "padding": op.padding, "dilation": op.dilation, "groups": op.groups}
            out.append(("Conv", tuple(op.weight.shape), op.bias is not None, attrs))
        else:
            out.append(("Gemm", tuple(op.weight.shape), op.bias is not None, {}))
    return out


def form_graph(
    ops: Sequence[tuple[str, tuple[int, ...], bool, dict[str, Any]]],
    input_shape: Sequence[int],
    *,
    seed: int = 0,
    check: bool = False,
):
    """An ONNX ModelProto running ``ops`` (:func:`op_shapes`) on an input of ``input_shape``
    (its first axis, the batch, dynamic as in the export), random float32 weights.
    ``check``: run ``onnx.checker`` on it (onnxruntime validates it as it loads it anyway)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = _INPUT
    rank = len(input_shape)
    shape: list[Any] = ["batch", *[int(d) for d in input_shape[1:]]]
    for i, (kind, wshape, bias, attrs) in enumerate(ops):
        w = numpy_helper.from_array(_weights(rng, wshape), f"w{i}")
        inits.append(w)
        names = [x, w.name]
        if bias:
            b = numpy_helper.from_array(_weights(rng, (wshape[0],)), f"b{i}")
            inits.append(b)
        y = _OUTPUT if i == len(ops) - 1 else f"h{i}"
        if kind == "Conv":
            ph, pw = attrs["padding"]
            shape = [shape[0], wshape[0]] + [
                (n + 2 * p - d * (k - 1) - 1) // st + 1
                for n, p, d, k, st in zip(shape[2:], (ph, pw), attrs["dilation"], wshape[2:], attrs["stride"])
            ]
            nodes.append(
                helper.make_node(
                    "Conv",
                    names + ([f"b{i}"] if bias else []),
                    [y],
                    kernel_shape=list(wshape[2:]),
                    strides=list(attrs["stride"]),
                    pads=[ph, pw, ph, pw],
                    dilations=list(attrs["dilation"]),
                    group=int(attrs["groups"]),
                )
            )
        elif rank == 2:
            nodes.append(helper.make_node("Gemm", names + ([f"b{i}"] if bias else []), [y], transB=1))
        else:  # as the exporter writes a Linear on a (batch, tokens, features) input
            t = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(w).T), f"wt{i}")
            inits[-2 if bias else -1] = t
            mm = f"m{i}" if bias else y
            nodes.append(helper.make_node("MatMul", [x, t.name], [mm]))
            if bias:
                nodes.append(helper.make_node("Add", [mm, f"b{i}"], [y]))
        if kind == "Gemm":
            shape = [*shape[:-1], wshape[0]]
        x = y
    dims: list[Any] = ["batch", *[int(d) for d in input_shape[1:]]]
    graph = helper.make_graph(
        nodes,
        "layer",
        [helper.make_tensor_value_info(_INPUT, TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info(_OUTPUT, TensorProto.FLOAT, shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="compressor")
    model.ir_version = min(model.ir_version, 10)  # readable by older onnxruntime builds too
    if check:
        onnx.checker.check_model(model)
    return model


def _weights(rng: np.random.Generator, shape: Sequence[int]) -> np.ndarray:
    """Small random float32 weights (uniform: drawn fast even for a 25088×4096 matrix)."""
    w = rng.random(tuple(shape), dtype=np.float32)
    w -= 0.5
    w *= 0.1
    return w


__all__ = ["OPSET", "form_graph", "op_shapes", "plain_ops"]
