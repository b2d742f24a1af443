"""Recognizing what aa-deploy inserted in a graph: its marked nodes and fixed blurs, however they came.

The runtimes (the ONNX -> PyTorch bridge, fp16 and INT8 precision), calibration and the graph pass all ask
these questions of a converted graph; building the nodes is the graph pass's (`conversion.blur_nodes`).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from aa_deploy.common import graph

MARK = "aa_deploy.blur"  # metadata key on every node this tool inserts


def is_inserted(node: ir.Node) -> bool:
    """A node aa-deploy inserted (a blur or its glue, marked with MARK), or a fixed blur however it came."""
    return bool(node.metadata_props.get(MARK)) or is_fixed_blur(node)


def is_fixed_blur(node: ir.Node | None) -> bool:
    """A depthwise Conv whose constant taps are non-negative, sum to one and match in every channel;
    or an AveragePool that is a blur: one of ours, or any with stride 1 (a box filter)."""
    if graph.is_onnx(node, "AveragePool"):
        return bool(node.metadata_props.get(MARK)) or all(s == 1 for s in graph.ints(node, "strides", []))
    if not graph.is_onnx(node, "Conv") or len(node.inputs) < 2:
        return False
    shape = graph.dims(node.inputs[1])  # from metadata: big weights stay on disk unless depthwise
    if shape is not None and (len(shape) < 3 or shape[1] != 1 or shape[0] != node.attributes.get_int("group", 1)):
        return False
    weight = graph.const_array(node.inputs[1])
    if weight is None or weight.ndim < 3 or weight.shape[1] != 1:
        return False
    if node.attributes.get_int("group", 1) != weight.shape[0]:
        return False
    w = weight.astype(np.float64).reshape(weight.shape[0], -1)
    return bool((w >= 0).all() and np.allclose(w.sum(axis=1), 1.0, atol=1e-3) and np.allclose(w, w[:1], atol=1e-6))


def reads_blurred(value: ir.Value) -> bool:
    """True when `value` comes straight out of a fixed blur (through Pad/Transpose glue)."""
    producer = value.producer()
    for _ in range(4):
        if producer is None:
            return False
        if is_fixed_blur(producer):
            return True
        if not graph.is_onnx(producer, "Pad", "Transpose", "Identity"):
            return False
        producer = producer.inputs[0].producer() if producer.inputs[0] is not None else None
    return False


def blur_after(node: ir.Node) -> ir.Node | None:
    """The blur that reads `node`'s output through aa-deploy glue (a blurpool site), or None: its
    Conv, or the last AveragePool of its pooled form."""
    readers = list(node.outputs[0].consumers())
    pool = None
    while len(readers) == 1 and readers[0].metadata_props.get(MARK):
        reader = readers[0]
        if reader.op_type == "Conv":
            return reader
        if reader.op_type == "AveragePool":
            pool = reader
        elif pool is not None:  # the Transpose back to channels-last after the pools
            break
        readers = list(reader.outputs[0].consumers())
    return pool
