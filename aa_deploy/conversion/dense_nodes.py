"""The nodes dense sampling adds to a graph: a pool split by sampling phase, a per-phase value tiled over
a dense map, an average pool as a depthwise convolution with fixed taps; and, for a subset of the phases
(`phases`), a site's copy at one phase, the copies stacked on the batch axis, the stack reduced at a pool.

Along a dense axis that is `D` times denser than the original's `S` positions, position `D*j + p` is
position `j` of the original computed at sampling phase `p`. So splitting the axis into (S, D) and
reducing over the S part reduces each phase on its own, and tiling a D-long per-phase value S times
puts phase p's entry at every position whose phase is p.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

# Whole-map pools and the reduction that computes each over chosen axes.
GLOBAL_REDUCE = {"GlobalAveragePool": "ReduceMean", "GlobalMaxPool": "ReduceMax"}
REDUCE_OPS = frozenset(
    "ReduceMean ReduceMax ReduceMin ReduceSum ReduceSumSquare ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceProd".split()
)


def opset(g: ir.Graph) -> int:
    return g.opset_imports.get("", g.opset_imports.get("ai.onnx", 1))


def axes_as_input(op_type: str, version: int) -> bool:
    """Whether a Reduce* op takes its axes as an input (opset 13 for ReduceSum, 18 for the others)."""
    return version >= (13 if op_type == "ReduceSum" else 18)


def constant(g: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """A new initializer named after `name` (made unique)."""
    while name in g.initializers:
        name += "_"
    value = ir.Value(name=name, const_value=ir.tensor(array))
    value.shape, value.type = ir.Shape(array.shape), ir.TensorType(ir.DataType.from_numpy(array.dtype))
    g.register_initializer(value)
    return value


def _fresh(g: ir.Graph, base: str) -> str:
    """`base`, or `base_2`, `base_3`, ...: a name no node or value of `g` has."""
    taken = {n.name for n in g.all_nodes()} | {v.name for n in g.all_nodes() for v in (*n.inputs, *n.outputs) if v}
    taken |= {v.name for v in (*g.inputs, *g.initializers.values())}
    name, i = base, 1
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name


def _make(
    g: ir.Graph, anchor: ir.Node, op_type: str, inputs: Sequence[ir.Value | None], suffix: str, attributes
) -> ir.Node:
    base = f"{anchor.name or anchor.outputs[0].name}/{suffix}"  # exporters may leave nodes unnamed
    node = ir.Node(
        "",
        op_type,
        inputs,
        attributes=[ir.convenience.convert_attribute(k, v) for k, v in attributes.items()],
        name=_fresh(g, base),
    )
    node.outputs[0].name = _fresh(g, f"{base}_output")
    return node


def _node(
    g: ir.Graph, anchor: ir.Node, op_type: str, inputs: Sequence[ir.Value | None], suffix: str, **attributes
) -> ir.Value:
    """A new node right before `anchor`; its output."""
    node = _make(g, anchor, op_type, inputs, suffix, attributes)
    g.insert_before(anchor, node)
    return node.outputs[0]


def _after(
    g: ir.Graph, anchor: ir.Node, op_type: str, inputs: Sequence[ir.Value], suffix: str, **attributes
) -> ir.Node:
    """A new node right after `anchor` (nodes built in order, each after the previous one)."""
    node = _make(g, anchor, op_type, inputs, suffix, attributes)
    g.insert_after(anchor, node)
    return node


def reduce_per_phase(
    g: ir.Graph,
    node: ir.Node,
    reduce_op: str,
    reduce_axes: Sequence[int],
    dense: dict[int, tuple[int, int]],
    dims: Sequence[int | None],
) -> None:
    """Replace the whole-map pool `node` (its input dense at axes `dense`: axis -> (original size S,
    factor D)) by the same reduction over each phase: Reshape (split S x D) -> Reduce over the S parts
    and `reduce_axes`' other axes, keeping dims -> Reshape (each dense axis now D long)."""
    first = min(dense)
    split: list[int] = []
    merged: list[int] = []
    index: dict[int, int] = {}
    for axis, size in enumerate(dims):
        index[axis] = len(split)
        if axis in dense:
            split += list(dense[axis])
            merged.append(dense[axis][1])
        else:
            split.append(0 if axis < first else int(size))
            merged.append(0 if axis < first else (1 if axis in reduce_axes else int(size)))
    axes = sorted(index[a] for a in reduce_axes)
    x = node.inputs[0]
    shaped = _node(g, node, "Reshape", [x, constant(g, f"{node.name}.phases", np.array(split, np.int64))], "phases")
    version = opset(g)
    if axes_as_input(reduce_op, version):
        reduced = _node(
            g,
            node,
            reduce_op,
            [shaped, constant(g, f"{node.name}.phase_axes", np.array(axes, np.int64))],
            "per_phase",
            keepdims=1,
        )
    else:
        reduced = _node(g, node, reduce_op, [shaped], "per_phase", axes=axes, keepdims=1)
    out = _node(g, node, "Reshape", [reduced, constant(g, f"{node.name}.merged", np.array(merged, np.int64))], "merged")
    old = node.outputs[0]
    name = old.name
    ir.convenience.replace_all_uses_with(old, out)
    g.remove(node, safe=True)
    out.name = name
    out.producer().name = node.name or out.producer().name


def tile(g: ir.Graph, node: ir.Node, index: int, repeats: Sequence[int]) -> None:
    """Input `index` of `node` (a per-phase value) tiled by `repeats` over the dense map it joins."""
    value = node.inputs[index]
    tiled = _node(
        g, node, "Tile", [value, constant(g, f"{node.name}.tile_{index}", np.array(repeats, np.int64))], f"tile_{index}"
    )
    node.replace_input_with(index, tiled)


def average_weights(channels: int, kernel: Sequence[int], dtype: np.dtype) -> np.ndarray:
    """An average pool's window as depthwise convolution taps: every tap 1 / (window size)."""
    return np.full((channels, 1, *kernel), 1.0 / float(np.prod(kernel)), dtype=dtype)


def _copy(g: ir.Graph, node: ir.Node, inputs: Sequence[ir.Value | None], suffix: str, **changed) -> ir.Value:
    """A copy of `node` before it, reading `inputs`, its attributes as they are except `changed`."""
    attributes = {name: attr.value for name, attr in node.attributes.items() if name not in changed} | changed
    return _node(g, node, node.op_type, inputs, suffix, **attributes)


def slice_start(g: ir.Graph, x: ir.Value, anchor: ir.Node, starts: dict[int, int]) -> ir.Value:
    """`x` without its first `starts[axis]` entries along each axis (a Slice, before `anchor`)."""
    axes = sorted(a for a, s in starts.items() if s)
    begin = np.array([starts[a] for a in axes], np.int64)
    end = np.full(len(axes), np.iinfo(np.int64).max, np.int64)
    if opset(g) < 10:
        return _node(g, anchor, "Slice", [x], "phase_slice", starts=begin.tolist(), ends=end.tolist(), axes=axes)
    name = anchor.name or "phase"
    return _node(
        g,
        anchor,
        "Slice",
        [
            x,
            constant(g, f"{name}.phase_starts", begin),
            constant(g, f"{name}.phase_ends", end),
            constant(g, f"{name}.phase_axes", np.array(axes, np.int64)),
        ],
        "phase_slice",
    )


def window_at_phase(g: ir.Graph, node: ir.Node, x: ir.Value, pads: Sequence[int], suffix: str, **changed) -> ir.Value:
    """A copy of the window op `node` (Conv or pool) reading `x` with `pads`: one sampling phase."""
    inputs = [x, *node.inputs[1:]]
    return _copy(g, node, inputs, suffix, pads=list(pads), auto_pad="NOTSET", **changed)


def slice_at_phase(g: ir.Graph, node: ir.Node, x: ir.Value, starts: np.ndarray, suffix: str) -> ir.Value:
    """A copy of the Slice `node` reading `x` from `starts`: one sampling phase of a strided Slice."""
    inputs = [x, constant(g, f"{node.name or 'slice'}.{suffix}", starts), *node.inputs[2:]]
    return _copy(g, node, inputs, suffix)


def stack(g: ir.Graph, value: ir.Value, phases: Sequence[ir.Value]) -> None:
    """`value` (phase 0) and the other `phases` of it, one after the other along the batch axis, in place
    of `value` everywhere it is read."""
    stacked = _after(g, value.producer(), "Concat", [value, *phases], "phases", axis=0)
    _read_instead(value, stacked.outputs[0], but=stacked)


def reduce_stacked(g: ir.Graph, node: ir.Node, reduce_op: str, count: int, dims: Sequence[int]) -> None:
    """The output of the whole-map pool `node`, `count` phases stacked along its batch axis, reduced over
    the phases: Reshape (count, batch, dims...) -> `reduce_op` over the first axis; it replaces the pool's
    output everywhere."""
    old = node.outputs[0]
    shape = constant(g, f"{node.name or 'pool'}.phase_split", np.array([count, -1, *dims], np.int64))
    shaped = _after(g, node, "Reshape", [old, shape], "phase_split")
    if axes_as_input(reduce_op, opset(g)):
        axes = constant(g, f"{node.name or 'pool'}.phase_axis", np.array([0], np.int64))
        reduced = _after(g, shaped, reduce_op, [shaped.outputs[0], axes], "phase_mean", keepdims=0)
    else:
        reduced = _after(g, shaped, reduce_op, [shaped.outputs[0]], "phase_mean", axes=[0], keepdims=0)
    _read_instead(old, reduced.outputs[0], but=shaped)


def _read_instead(old: ir.Value, new: ir.Value, but: ir.Node) -> None:
    """Every reader of `old` but `but` (the node that reads it to make `new`) reads `new` instead."""
    for use in list(old.uses()):
        if use.node is not but:
            use.node.replace_input_with(use.idx, new)
