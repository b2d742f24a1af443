"""FP16 graphs: precision lives in the ONNX graph (TensorRT 11 has no FP16 builder flag).

onnxconverter-common converts weights and activations to float16 and keeps the model's inputs and
outputs float32. A blur whose taps are not exactly representable in float16 (widened filters such
as 1/3 or 1/9 taps at stride 3) stays float32, so every blur still sums to exactly one.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from aa_deploy.common import graph, inserted, model_io
from aa_deploy.common.atomic import atomic_path
from aa_deploy.common.errors import InputError


def inexact_blurs(model_path: str | os.PathLike) -> list[str]:
    """Blur nodes whose taps change when rounded to float16."""
    model = model_io.load(model_path)
    out = []
    for node in model.graph:
        if node.op_type == "Conv" and inserted.is_inserted(node):
            taps = graph.const_array(node.inputs[1])
            if taps is not None and not np.array_equal(taps.astype(np.float16).astype(taps.dtype), taps):
                out.append(node.name)
    return out


def to_fp16(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Write the float16 version of `src` to `dst`; returns the blur nodes kept in float32."""
    import warnings

    try:
        from onnxconverter_common import float16
    except ImportError:
        raise InputError("FP16 conversion needs onnxconverter-common (pip install onnxconverter-common)") from None
    src, dst = Path(src), Path(dst)
    keep = inexact_blurs(src)
    model = onnx.load(str(src))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # per-value notes about tiny weights flushed to fp16's range
        converted = float16.convert_float_to_float16(model, keep_io_types=True, node_block_list=keep)
    with atomic_path(dst) as tmp:
        onnx.save(converted, str(tmp))
        onnx.checker.check_model(str(tmp))
    return keep


def _float16_attribute(node: ir.Node) -> str | None:
    """The name of `node`'s attribute that makes or holds float16 values, if any."""
    for name, attr in node.attributes.items():
        if attr.type == ir.AttributeType.TENSOR and attr.value.dtype == ir.DataType.FLOAT16:
            return name
        if name in ("to", "dtype") and attr.type == ir.AttributeType.INT and attr.value == ir.DataType.FLOAT16:
            return name
    return None


def is_float16(model: ir.Model) -> bool:
    """Whether `model` computes in float16 anywhere: an input, output or initializer of that type, or a node
    making float16 values (a Cast to it, a float16 constant)."""
    values = [*model.graph.inputs, *model.graph.outputs, *model.graph.initializers.values()]
    return any(v.dtype == ir.DataType.FLOAT16 for v in values) or any(
        _float16_attribute(node) is not None for node in model.graph.all_nodes()
    )


def widen_float16(model: ir.Model) -> ir.Model:
    """`model` (changed in place) computing in float32 wherever it computed in float16: its inputs, outputs,
    initializers and intermediate values, Casts to float16 and float16 constants. Every float16 value is
    exact in float32, so the widened graph computes what the float16 one approximates; a float16 type set
    by another kind of attribute is refused in one line."""
    for value in (*model.graph.inputs, *model.graph.outputs):
        if value.dtype == ir.DataType.FLOAT16:
            value.dtype = ir.DataType.FLOAT
    for value in model.graph.initializers.values():
        if value.dtype == ir.DataType.FLOAT16:
            value.const_value = ir.tensor(value.const_value.numpy().astype(np.float32), name=value.name)
            value.dtype = ir.DataType.FLOAT
    for node in model.graph.all_nodes():
        name = _float16_attribute(node)
        if name is not None:
            attr = node.attributes[name]
            if attr.type == ir.AttributeType.TENSOR:
                node.attributes[name] = ir.AttrTensor(name, ir.tensor(attr.value.numpy().astype(np.float32)))
            elif node.op_type == "Cast":
                node.attributes[name] = ir.AttrInt64(name, ir.DataType.FLOAT)
            else:
                raise InputError(f"node {node.name} ({node.op_type}) makes float16 values by its {name!r} attribute")
        for value in node.outputs:
            if value.dtype == ir.DataType.FLOAT16:
                value.dtype = ir.DataType.FLOAT
    return model
