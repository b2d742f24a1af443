"""What a graph costs to run: multiply-adds from its static shapes (the convs, pools and matrix
products; elementwise ops are left out, as multiply-add counts usually do)."""

from __future__ import annotations

import math

import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from aa_deploy.common import graph


def _batch_1(dims: tuple | None) -> tuple | None:
    """`dims` with a dynamic leading (batch) dim read as 1."""
    return dims if not dims or dims[0] is not None else (1, *dims[1:])


def _gemm_per_sample(node: ir.Node) -> int | None:
    """A classifier's Gemm after a Flatten that a dynamic-batch export computes at run time (Shape ->
    Gather -> Concat -> Reshape): its input's shape is unknown, but one sample costs its weight's size."""
    if not graph.is_onnx(node, "Gemm") or node.attributes.get_int("transA", 0):
        return None
    weight = graph.dims(node.inputs[1])
    if weight is None or len(weight) != 2 or any(d is None for d in weight):
        return None
    return math.prod(weight)


def _node_macs(node: ir.Node) -> int | None:
    """Multiply-adds of one node, 0 for ops not counted, None when a shape it needs is unknown."""
    if not graph.is_onnx(node, "Conv", "ConvTranspose", "Gemm", "MatMul", "AveragePool", "MaxPool"):
        return 0
    out = _batch_1(graph.dims(node.outputs[0]))
    if out is None or any(d is None for d in out):
        return _gemm_per_sample(node)
    if node.op_type in ("Conv", "ConvTranspose"):
        weight = graph.dims(node.inputs[1])
        if weight is None or any(d is None for d in weight):
            return None
        per_output = math.prod(weight[1:]) if node.op_type == "Conv" else weight[0] * math.prod(weight[2:])
        if node.op_type == "ConvTranspose":  # every input position scatters into a kernel's worth of outputs
            x = _batch_1(graph.dims(node.inputs[0]))
            return None if x is None or None in x else math.prod(x) * weight[1] * math.prod(weight[2:])
        return math.prod(out) * per_output
    if node.op_type in ("AveragePool", "MaxPool"):
        kernel = graph.ints(node, "kernel_shape", ())
        return math.prod(out) * math.prod(kernel)
    a = graph.dims(node.inputs[0])
    if a is None or a[-1] is None:
        return _gemm_per_sample(node)
    k = a[0] if node.op_type == "Gemm" and node.attributes.get_int("transA", 0) else a[-1]
    return math.prod(out) * k


def multiply_adds(model: ir.Model) -> tuple[int, int]:
    """(multiply-adds, nodes whose cost is unknown for lack of static shapes) of the main graph at its
    declared input shape (a dynamic batch counts as 1)."""
    total, unknown = 0, 0
    for node in model.graph:
        macs = _node_macs(node)
        if macs is None:
            unknown += 1
        else:
            total += macs
    return total, unknown


def batch_of_one(model: ir.Model) -> ir.Model:
    """`model` (in place) with the dynamic batch of each graph input set to 1, before its shapes are inferred
    for counting: a dynamic batch counts as 1, and a batch that stacks sampling phases (`phases`) then counts
    as their number instead of as unknown. For counting only: never on a graph that is saved."""
    for value in model.graph.inputs:
        if value.shape is not None and len(value.shape) > 0 and not isinstance(value.shape[0], int):
            value.shape = ir.Shape([1, *value.shape[1:]])
    return model


def with_shapes(model: ir.Model) -> ir.Model:
    """`model` with static shapes inferred where they can be (in place), for counting."""
    ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)
    return model
