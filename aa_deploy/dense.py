"""Dense sampling at the last sites: the paper's second remedy, exact without training.

A site of the chosen levels runs at stride 1 and every spatial op after it is dilated by the factor
the map is now denser (à trous). Position `D*j + p` of a dense map is position `j` of the original
network's map computed at sampling phase `p`, so each phase computes exactly what the original
computes on the input shifted by `p` site pixels (zero-filled at the far border), and the global
average pool at the end averages the phases. Padding stays in phase units (multiplied by the
factor); a dense site's far-end padding is extended so that its map is exactly `stride` times the
original's, which gives every phase the same number of positions and the pool an exact mean.

    X -> Conv(stride 2) -> ... Conv(k, pads p) ... -> GlobalAveragePool -> Gemm
    X -> Conv(stride 1) -> ... Conv(k, dilation 2, pads 2p) ... -> GlobalAveragePool -> Gemm

Refused in one line where the result would not be the mean over phases: an op that bakes in the
spatial size (Reshape, Flatten, Gemm, Resize, Transpose, ...) or pools across phases inside the net
(a squeeze-excitation gate), a strided op after a dense site that is not dense itself, a dense
graph output, non-constant padding modes, channels-last sites, dynamic spatial sizes.

`analyse` is pure (inspect runs it); `apply` makes the edits it lists.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from aa_deploy import graph
from aa_deploy.errors import InputError
from aa_deploy.plan import Action
from aa_deploy.sites import strided_slice

# Ops that act on each position (and channel) alone: a dense map passes through them unchanged.
POINTWISE_OPS = frozenset(
    """Abs Add Cast Ceil Celu Clip Div Dropout Elu Equal Erf Exp Floor Gelu Greater GreaterOrEqual HardSigmoid
    HardSwish Identity LeakyRelu Less LessOrEqual Log Max Min Mish Mod Mul Neg Not Pow PRelu Reciprocal Relu
    Round Selu Sigmoid Sign Sin Softplus Softsign Sqrt Sub Sum Tanh ThresholdedRelu Where BatchNormalization
    QuantizeLinear DequantizeLinear""".split()
)
CHANNEL_OPS = ("Concat", "Split", "Softmax", "LogSoftmax")  # fine along the channel axis (1) only


@dataclass(eq=False)
class Edit:
    """One node's change: new attribute values, new constant inputs, or a new op type."""

    node: ir.Node
    attributes: dict[str, list[int]] = field(default_factory=dict)
    inputs: dict[int, np.ndarray] = field(default_factory=dict)
    op_type: str | None = None


@dataclass
class DensePlan:
    """What dense sampling changes: the edits, and the dense values (their shapes change)."""

    edits: list[Edit]
    dense_values: list[ir.Value]


def _refuse(node: ir.Node, why: str) -> InputError:
    return InputError(f"--dense-last: {node.op_type} node {node.name!r} {why}")


def _spatial(node: ir.Node, value: ir.Value) -> tuple[int, ...]:
    dims = graph.dims(value)
    if dims is None or len(dims) < 3 or any(d is None for d in dims[2:]):
        raise _refuse(node, "reads a map of unknown spatial size: dense sampling needs static shapes")
    return tuple(int(d) for d in dims[2:])


def _kernel(node: ir.Node) -> tuple[int, ...]:
    kernel = graph.ints(node, "kernel_shape")
    if kernel is None and node.op_type == "Conv":
        kernel = tuple((graph.dims(node.inputs[1]) or ())[2:])
    if not kernel or any(k is None for k in kernel):
        raise _refuse(node, "has no static kernel shape")
    return tuple(int(k) for k in kernel)


def _window_edit(node: ir.Node, factor: tuple[int, ...], site_stride: tuple[int, ...] | None) -> Edit:
    """Conv / MaxPool / AveragePool on a map `factor` times denser: dilations and pads times `factor`;
    a dense site also at stride 1, its far padding extended to `stride` times the original's output."""
    x = _spatial(node, node.inputs[0])
    kernel = _kernel(node)
    n = len(kernel)
    pads = graph.explicit_pads(node, x, kernel)
    dilations = graph.ints(node, "dilations", [1] * n)
    new_pads = [p * f for p, f in zip(pads, factor * 2)]
    if site_stride is not None:
        out = _spatial(node, node.outputs[0])
        for i in range(n):
            natural = factor[i] * (x[i] + pads[i] + pads[i + n] - dilations[i] * (kernel[i] - 1))
            new_pads[i + n] += factor[i] * site_stride[i] * out[i] - natural
    edit = Edit(node, {"dilations": [d * f for d, f in zip(dilations, factor)], "pads": new_pads})
    edit.attributes["strides"] = [1] * n
    if node.op_type == "AveragePool" and any(f > 1 for f in factor):
        if node.attributes.get_int("count_include_pad", 0) == 0 and any(pads):
            raise _refuse(node, "averages a padded window without counting the pads: not exact when dilated")
    return edit


def _opset(g: ir.Graph) -> int:
    return g.opset_imports.get("", g.opset_imports.get("ai.onnx", 1))


def _global_pool(node: ir.Node, rank: int) -> bool:
    """Whether the node averages over every spatial axis (the head's pool, or a squeeze-excitation's)."""
    if graph.is_onnx(node, "GlobalAveragePool"):
        return True
    if not graph.is_onnx(node, "ReduceMean"):
        return False
    axes = graph.ints(node, "axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        array = graph.const_array(node.inputs[1])
        axes = None if array is None else tuple(int(a) for a in array.reshape(-1))
    if axes is None:
        return False
    return set(range(2, rank)) <= {a % rank for a in axes}


def _folded(value: ir.Value, depth: int = 32) -> np.ndarray | None:
    """The value of a tensor computed from constants alone (the TorchScript exporter computes a Pad's
    pads with Concat/Reshape/Slice/Cast of Constants), evaluated with ONNX's reference evaluator."""
    array = graph.const_array(value)
    if array is not None or depth == 0:
        return array
    producer = value.producer()
    if producer is None or producer.domain not in ("", "ai.onnx") or producer.attributes.get("value") is not None:
        return None
    inputs = [None if v is None else _folded(v, depth - 1) for v in producer.inputs]
    if any(v is not None and a is None for v, a in zip(producer.inputs, inputs)):
        return None
    import onnx
    from onnx.reference import ReferenceEvaluator

    names = [f"i{i}" if v is not None else "" for i, v in enumerate(producer.inputs)]
    proto = ir.serde.serialize_node(producer)
    del proto.input[:]
    proto.input.extend(names)
    del proto.output[:]
    proto.output.extend([f"o{i}" for i in range(len(producer.outputs))])
    evaluator = ReferenceEvaluator(
        onnx.helper.make_graph(
            [proto],
            "fold",
            [],
            [
                onnx.helper.make_tensor_value_info(f"o{i}", onnx.TensorProto.UNDEFINED, None)
                for i in range(len(producer.outputs))
            ],
            [onnx.numpy_helper.from_array(np.asarray(a), n) for n, a in zip(names, inputs) if n],
        ),
        opsets={"": _opset(producer.graph)},
    )
    try:
        results = evaluator.run(None, {})
    except Exception:  # noqa: BLE001 - not foldable: the caller refuses in one line
        return None
    return np.asarray(results[list(producer.outputs).index(value)])


def _pad_edit(node: ir.Node, factor: tuple[int, ...]) -> Edit:
    if node.attributes.get_string("mode", "constant") != "constant":
        raise _refuse(node, "pads by reflection or replication: its mirror lines are not in phase units")
    pads = _folded(node.inputs[1])
    if pads is None or (len(node.inputs) > 3 and node.inputs[3] is not None):
        raise _refuse(node, "has pads that are not a constant over every axis")
    rank = len(pads) // 2
    scale = np.array(([1, 1] + list(factor)) * 2, dtype=pads.dtype)
    return Edit(node, inputs={1: pads * scale[: 2 * rank]})


def _slice_edits(site_nodes: list[ir.Node], node: ir.Node) -> list[Edit]:
    """Strided Slices of a dense site at step 1 (a step-1 slice from 0 keeps the whole dense map)."""
    edits = []
    for sl in site_nodes:
        starts, steps = graph.const_array(sl.inputs[1]), graph.const_array(sl.inputs[4])
        strided = [i for i, s in enumerate(steps.reshape(-1)) if s > 1]
        if starts is None or any(int(starts.reshape(-1)[i]) != 0 for i in strided):
            raise _refuse(node, "subsamples from an offset other than 0")
        edits.append(Edit(sl, inputs={4: np.ones_like(steps)}))
    return edits


def analyse(g: ir.Graph, actions: list[Action]) -> DensePlan | None:
    """The edits that make the `dense` sites of `actions` dense, or None when there are none; an
    InputError (one line) where the result would not be the mean of the original over the phases."""
    dense_sites = {id(a.site.node): a.site for a in actions if a.action == "dense"}
    if not dense_sites:
        return None
    for site in dense_sites.values():
        if site.node.graph is not g:
            raise _refuse(site.node, "is inside an If/Loop/Scan body: dense sampling works on the main graph")
        if site.channel_axis != 1 or site.rank != 4 or site.kind == "patch-merge":
            raise _refuse(
                site.node,
                f"is a {site.kind} site over {site.layout}: dense sampling takes NCHW convs, pools and slices",
            )
    slice_nodes = {
        id(site.node): strided_slice.tree_from(site.node)[0]
        for site in dense_sites.values()
        if site.kind == "strided-slice"
    }
    inner = {id(n): root for root, nodes in slice_nodes.items() for n in nodes[1:]}
    opset = _opset(g)
    factor: dict[int, tuple[int, ...]] = {}  # value -> how much denser it is per spatial axis
    pooled: set[int] = set()  # values computed from a map pooled across phases
    edits: list[Edit] = []
    dense_values: list[ir.Value] = []
    for node in g:
        live = [v for v in node.inputs if v is not None and graph.const_array(v) is None]
        dense_in = [factor[id(v)] for v in live if id(v) in factor]
        out: tuple[int, ...] | None = None
        if id(node) in inner:
            out = factor.get(id(node.inputs[0]))  # handled with its root
        elif id(node) in dense_sites:
            site = dense_sites[id(node)]
            f_in = dense_in[0] if dense_in else (1, 1)
            strides = tuple(site.strides[site.axes.index(a)] if a in site.axes else 1 for a in (2, 3))
            if site.kind == "strided-slice":
                if any(size % s for size, s in zip(_spatial(node, site.value), strides)):
                    raise _refuse(node, "subsamples a map whose size is not a multiple of its stride")
                edits += _slice_edits(slice_nodes[id(node)], node)
            else:
                if node.op_type == "AveragePool" and any(f > 1 for f in f_in) and opset < 19:
                    raise _refuse(node, "would need a dilated AveragePool (opset 19): convert with --target-opset 19")
                edits.append(_window_edit(node, f_in, strides))
            out = tuple(f * s for f, s in zip(f_in, strides))
        elif not dense_in:
            if any(id(v) in pooled for v in live):
                pooled.update(id(v) for v in node.outputs)
            continue
        else:
            f = dense_in[0]
            if any(d != f for d in dense_in) or len(dense_in) < len(
                [v for v in live if (graph.dims(v) or (1, 1, 1))[2:] not in ((), (1,), (1, 1))]
            ):
                raise _refuse(node, "joins a densely sampled map with one that is not (a path around the dense sites?)")
            if any(id(v) in pooled for v in live):
                raise _refuse(
                    node,
                    "gates the map with a pool over all of it (squeeze-excitation): that pool mixes the sampling phases",
                )
            out = f
            if node.op_type in POINTWISE_OPS:
                pass
            elif node.op_type in ("Conv", "MaxPool", "AveragePool"):
                if any(s > 1 for s in graph.ints(node, "strides", [1, 1])):
                    raise _refuse(node, "subsamples after a dense site: give --dense-last a larger N to include it")
                kernel = _kernel(node)
                if node.op_type == "AveragePool" and any(k > 1 for k in kernel):
                    if _global_like(node, kernel):
                        edits.append(Edit(node, op_type="GlobalAveragePool"))
                        out = None
                        pooled.update(id(v) for v in node.outputs)
                    elif opset < 19:
                        raise _refuse(
                            node, "would need a dilated AveragePool (opset 19): convert with --target-opset 19"
                        )
                    else:
                        edits.append(_window_edit(node, f, None))
                elif any(k > 1 for k in kernel):
                    edits.append(_window_edit(node, f, None))
            elif node.op_type == "Pad":
                edits.append(_pad_edit(node, f))
            elif (
                node.op_type in CHANNEL_OPS
                and node.attributes.get_int("axis", 1 if node.op_type != "Softmax" else -1) == 1
            ):
                pass
            elif _global_pool(node, 4):
                out = None
                pooled.update(id(v) for v in node.outputs)
            else:
                raise _refuse(node, "would see a densely sampled map: it depends on the spatial size or layout")
        if out is not None:
            for v in node.outputs:
                if v is None:
                    continue
                if v.is_graph_output():
                    raise _refuse(node, "writes a densely sampled graph output: its shape would change")
                factor[id(v)] = out
                dense_values.append(v)
    return DensePlan(edits, dense_values)


def _global_like(node: ir.Node, kernel: tuple[int, ...]) -> bool:
    """An AveragePool whose window covers its whole unpadded map in the original: a global pool."""
    x = _spatial(node, node.inputs[0])
    return tuple(kernel) == x and not any(graph.explicit_pads(node, x, kernel))


def apply(g: ir.Graph, dense: DensePlan) -> None:
    """Make the edits of `dense` in `g`; the dense values lose their (now wrong) shapes."""
    for edit in dense.edits:
        node = edit.node
        if edit.op_type is not None:
            node.op_type = edit.op_type
            node.attributes.clear()
            continue
        for name, values in edit.attributes.items():
            node.attributes[name] = ir.AttrInt64s(name, values)
        if edit.attributes and "auto_pad" in node.attributes:
            node.attributes["auto_pad"] = ir.AttrString("auto_pad", "NOTSET")
        if edit.attributes.get("strides") and node.attributes.get_int("ceil_mode", 0):
            node.attributes["ceil_mode"] = ir.AttrInt64("ceil_mode", 0)  # stride 1: no partial windows
        for index, array in edit.inputs.items():
            old = node.inputs[index]
            name = f"{node.name or old.name}.dense_{index}"
            while name in g.initializers:
                name += "_"
            value = ir.Value(name=name, const_value=ir.tensor(array))
            value.shape, value.type = ir.Shape(array.shape), ir.TensorType(ir.DataType.from_numpy(array.dtype))
            g.register_initializer(value)
            node.replace_input_with(index, value)
            if old.is_initializer() and not old.uses() and not old.is_graph_input():
                g.initializers.pop(old.name)
    for value in dense.dense_values:
        value.shape = None
