"""One group of layers of a QDQ model put back in float, without quantizing the model again.

The sensitivity search (:mod:`.sensitivity`) needs the model with each unit in float in turn.
Quantizing it again for every unit repeats the per-channel weight quantization of the whole
graph each time; the copy made here only rewires the unit's nodes of the already quantized
model: their weights and biases are the FP32 model's again, and the activations between them
skip their quantize/dequantize pair. The activations entering and leaving the unit stay
quantized, as they mostly do when onnxruntime's quantizer excludes the unit's nodes (their
neighbours quantize them; only a tensor no quantized node touches, such as the model's input
before an excluded first layer, then stays float). The ranking it gives matched re-quantizing
every unit on EfficientNet-Lite0 (docs/int8.md).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any


def float_unit(quantized: Any, fp32: Any, nodes: Collection[str]) -> Any:
    """A copy of the QDQ ``quantized`` model (an onnx ModelProto) in which the nodes named
    ``nodes`` compute in float, their weights and biases taken from ``fp32`` (the model it was
    quantized from, same node names)."""
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(quantized)
    graph = out.graph
    producer = {o: n for n in graph.node for o in n.output}
    have = {i.name for i in graph.initializer}
    reference = {n.name: n for n in fp32.graph.node}
    fp32_weights = {i.name: i for i in fp32.graph.initializer}
    inside = {o for n in graph.node if n.name in nodes for o in n.output}
    for node in graph.node:
        if node.name not in nodes:
            continue
        ref = reference.get(node.name)
        for k, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            if dq.input[0] in have:  # a quantized weight or bias: the float one
                if ref is not None and k < len(ref.input) and ref.input[k] in fp32_weights:
                    # the quantizer may have given the dequantized bias the float one's name
                    fname = ref.input[k] + ("_float" if ref.input[k] in producer else "")
                    node.input[k] = fname
                    if fname not in have:
                        weight = onnx.TensorProto()
                        weight.CopyFrom(fp32_weights[ref.input[k]])
                        weight.name = fname
                        graph.initializer.append(weight)
                        have.add(fname)
                continue
            q = producer.get(dq.input[0])
            # an activation inside the unit: float; unless the quantizer folded an op into the
            # pair (a ReLU becomes the range of uint8 activations), which the FP32 model shows
            same = ref is not None and k < len(ref.input) and ref.input[k] == (q.input[0] if q is not None else None)
            if q is not None and q.op_type == "QuantizeLinear" and q.input[0] in inside and same:
                node.input[k] = q.input[0]
    _prune(graph)
    return out


def _prune(graph: Any) -> None:
    """Drop the nodes and initializers nothing uses any more (the bypassed Q/DQ pairs)."""
    used = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in used for o in node.output):
            keep.append(node)
            used.update(i for i in node.input if i)
    kept = list(reversed(keep))
    del graph.node[:]
    graph.node.extend(kept)
    weights = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(weights)
