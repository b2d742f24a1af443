"""Small read-only questions about an onnx_ir graph: constants, static shapes, attributes, scopes."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

_SCOPE = re.compile(r"/?([\w.\-]+): [\w.]+")
_PARAMETER = re.compile(r"\w+(\.\w+)*\.weight")


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value as a NumPy array if it is an initializer, a Constant or a ConstantOfShape output."""
    if value is None:
        return None
    try:
        tensor = ir.convenience.get_const_tensor(value)
    except ValueError:
        tensor = None
    if tensor is not None:
        return tensor.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "ConstantOfShape" and producer.domain == "":
        shape = const_array(producer.inputs[0])
        if shape is None:
            return None
        fill = producer.attributes.get_tensor("value")
        fill_array = fill.numpy().reshape(()) if fill is not None else np.float32(0)
        return np.full(tuple(int(d) for d in shape), fill_array, dtype=fill_array.dtype)
    if producer is not None and producer.op_type == "Identity" and producer.domain == "":
        return const_array(producer.inputs[0])
    return None


def data_inputs(g: ir.Graph) -> list[ir.Value]:
    """The graph inputs that are not initializers: what a caller feeds. IR version 3 lists every
    initializer as a graph input too, and the ONNX Model Zoo's classic CNNs list them before the image."""
    return [v for v in g.inputs if v.name not in g.initializers]


def const_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    """Shape of a constant value without materializing it (ConstantOfShape reads only its shape)."""
    if value is None:
        return None
    if value.const_value is not None:
        return tuple(value.const_value.shape.numpy())
    producer = value.producer()
    if producer is not None and producer.op_type == "ConstantOfShape" and producer.domain == "":
        shape = const_array(producer.inputs[0])
        return None if shape is None else tuple(int(d) for d in shape)
    array = const_array(value)
    return None if array is None else array.shape


def dims(value: ir.Value | None) -> tuple[int | None, ...] | None:
    """Static dims of a value (None for a dynamic dim), or None when even the rank is unknown."""
    if value is None:
        return None
    if value.shape is not None:
        return tuple(d if isinstance(d, int) else None for d in value.shape.dims)
    return const_shape(value)


def ints(node: ir.Node, name: str, default: Sequence[int] | None = None) -> tuple[int, ...] | None:
    """An INTS attribute as a tuple, or `default`."""
    attr = node.attributes.get(name)
    if attr is None:
        return None if default is None else tuple(default)
    return tuple(int(v) for v in attr.as_ints())


def is_onnx(node: ir.Node | None, *op_types: str) -> bool:
    """True for a node of the default ONNX domain with one of `op_types`."""
    return node is not None and node.domain in ("", "ai.onnx") and node.op_type in op_types


def module_scope(node: ir.Node) -> str:
    """The PyTorch module path of a node (e.g. 'layer2.0.conv1'), or ''.

    A Conv whose weight is a named parameter (`<module path>.weight`, as torch's exporters name them)
    is that module's: when BatchNorm was folded into it, the exporter's recorded scope is the
    BatchNorm's, and a user selecting sites by module path means the convolution.
    """
    if is_onnx(node, "Conv", "ConvTranspose") and len(node.inputs) > 1 and node.inputs[1] is not None:
        weight = node.inputs[1]
        if weight.is_initializer() and _PARAMETER.fullmatch(weight.name or ""):
            return weight.name.removesuffix(".weight")
    namespace = node.metadata_props.get("namespace", "")
    names = _SCOPE.findall(namespace.split(": ", 1)[-1] if namespace.startswith(": ") else namespace)
    # The last element is the aten op itself; the one before it is the innermost module.
    return names[-2] if len(names) >= 2 else ""


def unique_consumers(value: ir.Value) -> list[ir.Node]:
    """Consumers of `value`, each once, in graph order of first use."""
    seen: dict[int, ir.Node] = {}
    for node in value.consumers():
        seen.setdefault(id(node), node)
    return list(seen.values())


def explicit_pads(node: ir.Node, sizes: Sequence[int], kernel: Sequence[int]) -> list[int]:
    """A Conv's or pool's pads (begins, then ends) with `auto_pad` resolved for input `sizes`, as ONNX
    computes them: SAME_UPPER puts the odd pixel at the end, SAME_LOWER at the beginning; VALID pads
    nothing (tf2onnx writes SAME_UPPER)."""
    n = len(kernel)
    auto = node.attributes.get_string("auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        return list(ints(node, "pads", [0] * (2 * n)))
    if auto == "VALID":
        return [0] * (2 * n)
    strides, dilations = ints(node, "strides", [1] * n), ints(node, "dilations", [1] * n)
    begins, ends = [], []
    for size, k, st, d in zip(sizes, kernel, strides, dilations):
        total = max(0, (math.ceil(size / st) - 1) * st + d * (k - 1) + 1 - size)
        small, large = total // 2, total - total // 2
        begins.append(small if auto == "SAME_UPPER" else large)
        ends.append(large if auto == "SAME_UPPER" else small)
    return begins + ends
