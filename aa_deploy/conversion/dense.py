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

A pool over the whole map whose result comes back onto the map (a squeeze-excitation gate, a
global response norm) would mix the phases; it is split by phase instead (`dense_nodes`): each phase
is pooled on its own, the gate path runs once per phase (its values are "phased": one entry per
phase along each spatial axis), and the gate is tiled back over the dense map, so every phase still
computes exactly what the original computes at that phase.

The analysis walks the graph once in order, tracking for each value where its spatial axes sit and
how much denser they are (`Map`); one small rule per op family (`RULES`) returns a `Verdict` for a
node: accept (the map its outputs carry), rewrite (that map and the node's edits), or refuse with
the reason the result would not be the mean of the original over the phases (one line). `analyse`
is pure (inspect runs it); `apply` makes the edits it lists.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import onnx_ir as ir

from aa_deploy.common import graph
from aa_deploy.common.errors import InputError
from aa_deploy.conversion import dense_nodes
from aa_deploy.conversion.plan import Action
from aa_deploy.conversion.sites import strided_slice

# Ops that act on each position (and channel) alone: a dense map passes through them unchanged.
POINTWISE_OPS = frozenset(
    """Abs Add Cast Ceil Celu Clip Div Dropout Elu Equal Erf Exp Floor Gelu Greater GreaterOrEqual HardSigmoid
    HardSwish Identity LeakyRelu Less LessOrEqual Log Max Min Mish Mod Mul Neg Not Pow PRelu Reciprocal Relu
    Round Selu Sigmoid Sign Sin Softplus Softsign Sqrt Sub Sum Tanh ThresholdedRelu Where BatchNormalization
    QuantizeLinear DequantizeLinear""".split()
)
# Ops over one axis (or the axes from one on): fine where that is not a spatial axis.
AXIS_OPS = {"Concat": 1, "Split": 0, "Softmax": -1, "LogSoftmax": -1, "Hardmax": -1, "LayerNormalization": -1}
WINDOW_OPS = ("Conv", "MaxPool", "AveragePool")
AROUND = "joins a densely sampled map with one that is not (a path around the dense sites?)"
# Their inputs after the first are per channel (along `axis`), not broadcast NumPy-style.
PER_CHANNEL_INPUTS = ("BatchNormalization", "QuantizeLinear", "DequantizeLinear")


@dataclass(frozen=True)
class Map:
    """Where a value's spatial axes sit and how it relates to the original there.

    Dense: each spatial axis holds `factor` times the original's `sizes` positions, phase = position
    mod factor. Phased: a per-phase pool's result, one entry per phase (its original size is 1)."""

    axes: tuple[int, ...]
    factor: tuple[int, ...]
    sizes: tuple[int, ...]
    phased: bool = False

    def on(self, axes: tuple[int, ...]) -> Map:
        return replace(self, axes=axes)

    def aligned(self, rank: int, own_rank: int) -> Map:
        """The same map seen in a broadcast to `rank` dims (NumPy aligns trailing axes)."""
        return self.on(tuple(a + rank - own_rank for a in self.axes))

    def dropped(self, axes: tuple[int, ...]) -> Map:
        """The same map after the (non-spatial) `axes` are removed."""
        return self.on(tuple(a - sum(r < a for r in axes) for a in self.axes))

    def by_axis(self) -> dict[int, tuple[int, int]]:
        """axis -> (original size, factor)."""
        return {a: (s, f) for a, s, f in zip(self.axes, self.sizes, self.factor)}


@dataclass(eq=False)
class Edit:
    """One node's change: a new op type (its attributes replaced), new attribute values, new constant
    inputs (an index past the last appends); or new nodes (`build`, run at apply time)."""

    node: ir.Node
    attributes: dict[str, list[int] | int] = field(default_factory=dict)
    inputs: dict[int, np.ndarray] = field(default_factory=dict)
    op_type: str | None = None
    build: Callable[[ir.Graph], None] | None = None


@dataclass
class DensePlan:
    """What dense sampling changes: the edits, and the values whose shapes change."""

    edits: list[Edit]
    dense_values: list[ir.Value]
    per_phase: int = 0  # whole-map pools split by phase (squeeze-excitation gates)
    heads: list[ir.Node] = field(default_factory=list)  # the whole-map pools that average the phases


class Refusal(InputError):
    """Why one node cannot be made dense, in one line: `--dense-last: <op> node '<name>' <why>`."""

    def __init__(self, node: ir.Node, why: str) -> None:
        super().__init__(f"--dense-last: {node.op_type} node {node.name!r} {why}")
        self.why = why


@dataclass(frozen=True)
class Verdict:
    """A rule's answer for one node: accept (the map its outputs carry), rewrite (that map and the
    node's edits) or refuse (why). `map` None with `head`: a pool over every phase, which averages
    them as intended and ends the map."""

    map: Map | None = None
    edits: tuple[Edit, ...] = ()
    why: str = ""
    head: bool = False

    @property
    def kind(self) -> str:
        return "refuse" if self.why else "rewrite" if self.edits else "accept"


def accept(m: Map | None, head: bool = False) -> Verdict:
    return Verdict(m, head=head)


def rewrite(m: Map | None, *edits: Edit, head: bool = False) -> Verdict:
    return Verdict(m, edits, head=head)


def refuse(why: str) -> Verdict:
    return Verdict(why=why)


def _rule(check: Callable[..., Verdict]) -> Callable[..., Verdict]:
    """A rule whose deeper checks (static shapes, constant inputs) refuse by raising: its verdict."""

    @functools.wraps(check)
    def rule(*args) -> Verdict:
        try:
            return check(*args)
        except Refusal as refusal:
            return refuse(refusal.why)

    return rule


class _SplitPools(Exception):
    """The walk met a whole-map pool's result coming back onto a dense map: start again with those
    pools split by phase."""

    def __init__(self, pools: frozenset[int]) -> None:
        super().__init__()
        self.pools = pools


def _spatial(node: ir.Node, value: ir.Value) -> tuple[int, ...]:
    dims = graph.dims(value)
    if dims is None or len(dims) < 3 or any(d is None for d in dims[2:]):
        raise Refusal(node, "reads a map of unknown spatial size: dense sampling needs static shapes")
    return tuple(int(d) for d in dims[2:])


def _rank(node: ir.Node, value: ir.Value) -> int:
    dims = graph.dims(value)
    if dims is None:
        raise Refusal(node, "has an input of unknown rank: dense sampling needs static shapes")
    return len(dims)


def kernel_of(node: ir.Node) -> tuple[int, ...]:
    kernel = graph.ints(node, "kernel_shape")
    if kernel is None and node.op_type == "Conv":
        kernel = tuple((graph.dims(node.inputs[1]) or ())[2:])
    if not kernel or any(k is None for k in kernel):
        raise Refusal(node, "has no static kernel shape")
    return tuple(int(k) for k in kernel)


def _const_ints(node: ir.Node, name: str, index: int) -> tuple[int, ...] | None:
    """An INTS attribute or, from the opset that moved it, the constant input at `index`."""
    values = graph.ints(node, name)
    if values is None and len(node.inputs) > index and node.inputs[index] is not None:
        array = graph.const_array(node.inputs[index])
        if array is None:
            raise Refusal(node, f"takes its {name} from a tensor that is not a constant")
        values = tuple(int(a) for a in array.reshape(-1))
    return values


@dataclass
class _Walk:
    """The analysis state: what each value is, and the edits so far."""

    g: ir.Graph
    per_phase: frozenset[int]  # whole-map pools to split by phase
    maps: dict[int, Map] = field(default_factory=dict)
    pooled: dict[int, frozenset[int]] = field(default_factory=dict)  # value -> the whole-map pools it comes from
    edits: list[Edit] = field(default_factory=list)
    heads: list[ir.Node] = field(default_factory=list)  # pools over every phase

    @property
    def opset(self) -> int:
        return dense_nodes.opset(self.g)


# --- windows: Conv, MaxPool, AveragePool ----------------------------------------------------------


def _window_edit(node: ir.Node, factor: tuple[int, ...], site_stride: tuple[int, ...] | None, opset: int) -> Edit:
    """Conv / MaxPool / AveragePool on a map `factor` times denser: dilations and pads times `factor`;
    a dense site also at stride 1, its far padding extended to `stride` times the original's output.
    An average pool that would need dilations below opset 19 becomes a depthwise Conv with its taps."""
    x = _spatial(node, node.inputs[0])
    kernel = kernel_of(node)
    n = len(kernel)
    pads = graph.explicit_pads(node, x, kernel)
    dilations = graph.ints(node, "dilations", [1] * n)
    new_pads = [p * f for p, f in zip(pads, factor * 2)]
    if site_stride is not None:
        out = _spatial(node, node.outputs[0])
        for i in range(n):
            natural = factor[i] * (x[i] + pads[i] + pads[i + n] - dilations[i] * (kernel[i] - 1))
            new_pads[i + n] += factor[i] * site_stride[i] * out[i] - natural
    new_dilations = [d * f for d, f in zip(dilations, factor)]
    attributes: dict[str, list[int] | int] = {"pads": new_pads, "strides": [1] * n}
    if node.op_type != "AveragePool" or any(d > 1 for d in new_dilations):
        attributes["dilations"] = new_dilations
    if node.op_type == "AveragePool" and not node.attributes.get_int("count_include_pad", 0):
        if any(f > 1 for f in factor) and any(pads):
            raise Refusal(node, "averages a padded window without counting the pads: not exact when dilated")
        if new_pads != [p * f for p, f in zip(pads, factor * 2)]:  # a site's far border, zero-filled
            if any(pads):
                raise Refusal(
                    node, "averages a padded window without counting the pads: its far border cannot be zero-filled"
                )
            attributes["count_include_pad"] = 1
        if opset < 19:  # no dilated AveragePool before opset 19: the same window as depthwise Conv taps
            channels = (graph.dims(node.inputs[0]) or (None, None))[1]
            if channels is None:
                raise Refusal(node, "has an unknown channel count: cannot write its dilated window as a Conv")
            dtype = ir.DataType(node.inputs[0].dtype).numpy() if node.inputs[0].dtype else np.float32
            attributes.pop("count_include_pad", None)  # a Conv counts every tap: the zero-filled border
            return Edit(
                node,
                attributes | {"kernel_shape": list(kernel), "group": int(channels)},
                inputs={1: dense_nodes.average_weights(int(channels), kernel, dtype)},
                op_type="Conv",
            )
    return Edit(node, attributes)


def _whole_map(node: ir.Node, kernel: tuple[int, ...]) -> bool:
    """A pool whose window covers its whole unpadded map in the original: a global pool."""
    x = _spatial(node, node.inputs[0])
    return tuple(kernel) == x and not any(graph.explicit_pads(node, x, kernel))


@_rule
def _window(w: _Walk, node: ir.Node, m: Map) -> Verdict:
    if m.axes != (2, 3) or _rank(node, node.inputs[0]) != 4:
        return refuse("runs a window over a densely sampled map that is not NCHW")
    kernel = kernel_of(node)
    if node.op_type in ("MaxPool", "AveragePool") and _whole_map(node, kernel):
        global_op = "GlobalMaxPool" if node.op_type == "MaxPool" else "GlobalAveragePool"
        if id(node) in w.per_phase:
            return _split_pool(node, m, dense_nodes.GLOBAL_REDUCE[global_op], (2, 3))
        return rewrite(None, Edit(node, op_type=global_op), head=True)
    if m.phased:
        if (
            any(k > 1 for k in kernel)
            or any(graph.ints(node, "pads", [0]))
            or any(s > 1 for s in graph.ints(node, "strides", [1]))
        ):
            return refuse("runs a window over a per-phase pooled value (only 1x1 convs can)")
        return accept(m)
    if any(s > 1 for s in graph.ints(node, "strides", [1, 1])):
        return refuse("subsamples after a dense site: give --dense-last a larger N to include it")
    x = _spatial(node, node.inputs[0])
    if any(k > 1 for k in kernel) or any(graph.explicit_pads(node, x, kernel)):
        return rewrite(m, _window_edit(node, m.factor, None, w.opset))
    return accept(m)


@_rule
def _site(w: _Walk, node: ir.Node, site, slices: list[ir.Node], m: Map | None) -> Verdict:
    factor = m.factor if m is not None else (1, 1)
    strides = tuple(site.strides[site.axes.index(a)] if a in site.axes else 1 for a in (2, 3))
    out = _spatial(node, node.outputs[0])
    if site.kind == "strided-slice":
        sizes = _spatial(node, site.value)
        out = tuple(size // s for size, s in zip(sizes, strides))  # the whole tree's, not the root's
        if any(size % s for size, s in zip(sizes, strides)):
            return refuse("subsamples a map whose size is not a multiple of its stride")
        edits = []
        for sl in slices:
            starts, steps = graph.const_array(sl.inputs[1]), graph.const_array(sl.inputs[4])
            strided = [i for i, s in enumerate(steps.reshape(-1)) if s > 1]
            if starts is None or any(int(starts.reshape(-1)[i]) != 0 for i in strided):
                return refuse("subsamples from an offset other than 0")
            edits.append(Edit(sl, inputs={4: np.ones_like(steps)}))
    else:
        edits = [_window_edit(node, factor, strides, w.opset)]
    return rewrite(Map((2, 3), tuple(f * s for f, s in zip(factor, strides)), out), *edits)


# --- whole-map pools and reductions ----------------------------------------------------------------


def _split_pool(node: ir.Node, m: Map, reduce_op: str, axes: tuple[int, ...]) -> Verdict:
    """The pool of `node` split by phase (squeeze-excitation): its result is phased."""
    if m.phased:
        return refuse("pools a per-phase pooled value again")
    dims = graph.dims(node.inputs[0])
    first = min(m.axes)
    if dims is None or any(d is None for i, d in enumerate(dims) if i > first and i not in m.axes):
        return refuse("pools a map with dynamic channels: cannot split it by phase")
    dense = m.by_axis()

    def build(g: ir.Graph) -> None:
        dense_nodes.reduce_per_phase(g, node, reduce_op, axes, dense, dims)

    return rewrite(Map(m.axes, m.factor, (1,) * len(m.axes), phased=True), Edit(node, build=build))


@_rule
def _reduce(w: _Walk, node: ir.Node, m: Map) -> Verdict:
    rank = _rank(node, node.inputs[0])
    if node.op_type in dense_nodes.GLOBAL_REDUCE:
        axes, keep = tuple(range(2, rank)), True
        reduce_op = dense_nodes.GLOBAL_REDUCE[node.op_type]
    else:
        axes = _const_ints(node, "axes", 1)
        if axes is None:
            if node.attributes.get_int("noop_with_empty_axes", 0):
                return accept(m)
            axes = tuple(range(rank))
        axes = tuple(sorted(a % rank for a in axes))
        keep, reduce_op = bool(node.attributes.get_int("keepdims", 1)), node.op_type
    spatial = set(m.axes) & set(axes)
    if not spatial:  # over channels only: each position on its own
        return accept(m if keep else m.dropped(axes))
    if spatial != set(m.axes):
        return refuse("reduces over some spatial axes but not all: not a mean over phases")
    if id(node) in w.per_phase:
        if not keep:
            return refuse("pools the whole map without keeping its axes: cannot split it by phase")
        return _split_pool(node, m, reduce_op, axes)
    if m.phased:
        return refuse("pools a per-phase pooled value again")
    return accept(None, head=True)


# --- layout: Transpose, Reshape, Squeeze/Unsqueeze, Slice, Pad ---------------------------------------


@_rule
def _transpose(w: _Walk, node: ir.Node, m: Map) -> Verdict:
    rank = _rank(node, node.inputs[0])
    perm = graph.ints(node, "perm", list(reversed(range(rank))))
    return accept(m.on(tuple(perm.index(a) for a in m.axes)))


@_rule
def _reshape(w: _Walk, node: ir.Node, m: Map) -> Verdict:
    """A Reshape that regroups only the axes before the map's spatial ones (a channel shuffle): the
    spatial axes and what follows them keep their sizes. Its shape constant gets the dense sizes."""
    din, dout = graph.dims(node.inputs[0]), graph.dims(node.outputs[0])
    shape = graph.const_array(node.inputs[1])
    first = min(m.axes)
    if din is None or dout is None or shape is None or any(d is None for d in din[first:]):
        return refuse("reshapes a densely sampled map to a shape that is not static")
    tail = tuple(din[first:])
    if len(dout) < len(tail) or tuple(dout[len(dout) - len(tail) :]) != tail:
        return refuse("reshapes the spatial axes of a densely sampled map: it depends on the spatial size")
    shift = len(dout) - len(din)
    new = shape.reshape(-1).astype(np.int64).copy()
    moved = m.on(tuple(a + shift for a in m.axes))
    for a, (size, f) in moved.by_axis().items():
        if not (new[a] == 0 and shift == 0):
            new[a] = size * f
    if not node.attributes.get_int("allowzero", 0):
        for j in np.flatnonzero(new[: len(dout) - len(tail)] == 0):
            if j in m.axes:
                return refuse("copies a spatial size into another axis: it depends on the spatial size")
    return rewrite(moved, Edit(node, inputs={1: new}))


@_rule
def _unsqueeze(w: _Walk, node: ir.Node, m: Map) -> Verdict:
    axes = _const_ints(node, "axes", 1)
    rank = _rank(node, node.inputs[0]) + len(axes)
    added = sorted(a % rank for a in axes)
    positions = [i for i in range(rank) if i not in added]  # where the input's axes land
    return accept(m.on(tuple(positions[a] for a in m.axes)))


@_rule
def _squeeze(w: _Walk, node: ir.Node, m: Map) -> Verdict:
    rank = _rank(node, node.inputs[0])
    axes = _const_ints(node, "axes", 1)
    if axes is None:
        dims = graph.dims(node.inputs[0])
        axes = tuple(i for i, d in enumerate(dims) if d == 1)
    axes = tuple(a % rank for a in axes)
    if set(axes) & set(m.axes):
        return refuse("squeezes a spatial axis of a densely sampled map")
    return accept(m.dropped(axes))


@_rule
def _slice(w: _Walk, node: ir.Node, m: Map) -> Verdict:
    rank = _rank(node, node.inputs[0])
    axes = _const_ints(node, "axes", 3)
    if axes is None:
        starts = _const_ints(node, "starts", 1)
        axes = tuple(range(len(starts)))
    if {a % rank for a in axes} & set(m.axes):
        return refuse("slices a spatial axis of a densely sampled map: it depends on the spatial size")
    return accept(m)


@_rule
def _pad(w: _Walk, node: ir.Node, m: Map) -> Verdict:
    if m.phased:
        return refuse("pads a per-phase pooled value")
    if node.attributes.get_string("mode", "constant") != "constant":
        return refuse("pads by reflection or replication: its mirror lines are not in phase units")
    attribute = graph.ints(node, "pads")  # opset < 11: pads is an attribute
    pads = np.array(attribute, np.int64) if attribute is not None else graph.const_array(node.inputs[1])
    if pads is None or (len(node.inputs) > 3 and node.inputs[3] is not None):
        return refuse("has pads that are not a constant over every axis")
    rank = len(pads) // 2
    scale = np.ones(2 * rank, dtype=pads.dtype)
    for a, (_, f) in m.by_axis().items():
        scale[a] = scale[a + rank] = f
    if attribute is not None:
        return rewrite(m, Edit(node, {"pads": [int(p) for p in pads * scale]}))
    return rewrite(m, Edit(node, inputs={1: pads * scale}))


# --- per-position ops: pointwise (with broadcasting), along one axis, MatMul ------------------------


@_rule
def _pointwise(w: _Walk, node: ir.Node, ins: list[Map | None]) -> Verdict:
    values = [v for v in node.inputs if v is not None]
    ranks = [_rank(node, v) for v in values]
    rank = max(ranks)
    aligned = {i: m.aligned(rank, _rank(node, node.inputs[i])) for i, m in enumerate(ins) if m is not None}
    dense = [m for m in aligned.values() if not m.phased]
    target = (dense or list(aligned.values()))[0]
    for m in aligned.values():
        if (m.axes, m.factor) != (target.axes, target.factor) or (not m.phased and m.sizes != target.sizes):
            return refuse("joins maps of different sampling densities")
    for i, v in enumerate(node.inputs):
        if v is None or i in aligned or (i > 0 and node.op_type in PER_CHANNEL_INPUTS):
            continue
        dims = graph.dims(v)
        if dims is None:
            return refuse("joins a densely sampled map with a value of unknown shape")
        offset = rank - len(dims)
        if any(0 <= a - offset < len(dims) and dims[a - offset] != 1 for a in target.axes):
            return refuse(AROUND)
    edits = []
    if not target.phased:
        for i, m in aligned.items():
            if m.phased:
                own = ins[i]
                repeats = [1] * _rank(node, node.inputs[i])
                for a, s in zip(own.axes, target.sizes):
                    repeats[a] = s
                edits.append(Edit(node, build=lambda g, i=i, repeats=repeats: dense_nodes.tile(g, node, i, repeats)))
    return rewrite(target, *edits)


@_rule
def _along_axis(w: _Walk, node: ir.Node, ins: list[Map | None]) -> Verdict:
    rank = _rank(node, next(v for v in node.inputs if v is not None))
    axis = node.attributes.get_int("axis", AXIS_OPS[node.op_type])
    if node.op_type in ("Softmax", "LogSoftmax", "Hardmax") and w.opset < 13:
        axis = node.attributes.get_int("axis", 1)  # flattens from `axis` on: every later axis too
        touched = set(range(axis % rank, rank))
    elif node.op_type == "LayerNormalization":
        touched = set(range(axis % rank, rank))
    else:
        touched = {axis % rank}
    m = next(m for m in ins if m is not None)
    if touched & set(m.axes):
        return refuse("works along a spatial axis of a densely sampled map: it depends on the spatial size")
    if node.op_type == "Concat":
        return _pointwise_join(node, ins, m)
    return accept(m)


def _pointwise_join(node: ir.Node, ins: list[Map | None], m: Map) -> Verdict:
    """A Concat along channels: every input must be the same kind of map."""
    for v, other in zip(node.inputs, ins):
        if v is not None and graph.const_array(v) is None and other != m:
            return refuse(AROUND)
    return accept(m)


@_rule
def _matmul(w: _Walk, node: ir.Node, ins: list[Map | None]) -> Verdict:
    """x @ W with W constant (a Linear over channels-last maps): per position unless x's last axis is
    spatial."""
    m, other = ins[0], node.inputs[1]
    if m is None or ins[1] is not None or graph.const_array(other) is None:
        return refuse("multiplies a densely sampled map as a matrix: it depends on the spatial size")
    rank = _rank(node, node.inputs[0])
    if rank - 1 in m.axes or (rank >= 2 and len(graph.dims(other) or ()) > 2):
        return refuse("multiplies along a spatial axis of a densely sampled map")
    return accept(m)


WHOLE_MAP_NORM = "normalizes over the whole map: its statistics would mix the sampling phases"


def _refuse_rule(why: str) -> Callable[..., Verdict]:
    def rule(w: _Walk, node: ir.Node, ins: list[Map | None]) -> Verdict:
        return refuse(why)

    return rule


# op type -> rule(walk, node, the inputs' maps) -> Verdict
RULES: dict[str, Callable[..., Verdict]] = (
    {op: lambda w, node, ins: _pointwise(w, node, ins) for op in POINTWISE_OPS}
    | {op: lambda w, node, ins: _along_axis(w, node, ins) for op in AXIS_OPS}
    | {op: lambda w, node, ins: _window(w, node, _first(ins)) for op in WINDOW_OPS}
    | {
        op: lambda w, node, ins: _reduce(w, node, _first(ins))
        for op in (*dense_nodes.REDUCE_OPS, *dense_nodes.GLOBAL_REDUCE)
    }
    | {
        "Transpose": lambda w, node, ins: _transpose(w, node, _first(ins)),
        "Reshape": lambda w, node, ins: _reshape(w, node, _first(ins)),
        "Unsqueeze": lambda w, node, ins: _unsqueeze(w, node, _first(ins)),
        "Squeeze": lambda w, node, ins: _squeeze(w, node, _first(ins)),
        "Slice": lambda w, node, ins: _slice(w, node, _first(ins)),
        "Pad": lambda w, node, ins: _pad(w, node, _first(ins)),
        "MatMul": lambda w, node, ins: _matmul(w, node, ins),
        "LRN": lambda w, node, ins: accept(_first(ins)),  # across channels, at each position
        "InstanceNormalization": _refuse_rule(WHOLE_MAP_NORM),
        "GroupNormalization": _refuse_rule(WHOLE_MAP_NORM),
    }
)


def _first(ins: list[Map | None]) -> Map:
    m = ins[0]
    if m is None:
        return next(x for x in ins if x is not None)
    return m


# --- the walk -------------------------------------------------------------------------------------


def _check_sites(g: ir.Graph, dense_sites: dict) -> None:
    for site in dense_sites.values():
        if site.node.graph is not g:
            raise Refusal(site.node, "is inside an If/Loop/Scan body: dense sampling works on the main graph")
        if site.channel_axis != 1 or site.rank != 4 or site.kind == "patch-merge":
            raise Refusal(
                site.node,
                f"is a {site.kind} site over {site.layout}: dense sampling takes NCHW convs, pools and slices",
            )


def _follow(w: _Walk, node: ir.Node, verdict: Verdict) -> Map | None:
    """Take one node's verdict into the walk: its edits, its pool over every phase; a refusal raises."""
    if verdict.why:
        raise Refusal(node, verdict.why)
    w.edits.extend(verdict.edits)
    if verdict.head:  # the head's (it averages the phases) until its result comes back onto a dense map
        w.heads.append(node)
        for v in node.outputs:
            if v is not None:
                w.pooled[id(v)] = frozenset({id(node)})
    return verdict.map


def _walk(g: ir.Graph, dense_sites: dict, per_phase: frozenset[int]) -> _Walk:
    slice_nodes = {
        id(site.node): strided_slice.tree_from(site.node)[0]
        for site in dense_sites.values()
        if site.kind == "strided-slice"
    }
    inner = {id(n) for nodes in slice_nodes.values() for n in nodes[1:]}
    w = _Walk(g, per_phase)
    for node in g:
        live = [v for v in node.inputs if v is not None and graph.const_array(v) is None]
        ins = [None if v is None else w.maps.get(id(v)) for v in node.inputs]
        pools = frozenset().union(*(w.pooled.get(id(v), frozenset()) for v in live))
        if id(node) in inner:
            out = w.maps.get(id(node.inputs[0]))  # handled with its root
        elif id(node) in dense_sites:
            site = dense_sites[id(node)]
            out = _follow(w, node, _site(w, node, site, slice_nodes.get(id(node), []), ins[0]))
        elif all(m is None for m in ins):
            if pools:
                for v in node.outputs:
                    if v is not None:
                        w.pooled[id(v)] = pools
            continue
        else:
            if pools:
                if pools <= per_phase:
                    raise Refusal(node, "joins a per-phase pooled value in a way that cannot be split by phase")
                raise _SplitPools(pools)
            rule = RULES.get(node.op_type) if graph.is_onnx(node, node.op_type) else None
            if rule is None:
                raise Refusal(node, "would see a densely sampled map: it depends on the spatial size or layout")
            out = _follow(w, node, rule(w, node, ins))
        if out is not None:
            for v in node.outputs:
                if v is None:
                    continue
                if v.is_graph_output():
                    raise Refusal(node, "writes a densely sampled graph output: its shape would change")
                w.maps[id(v)] = out
    return w


def analyse(g: ir.Graph, actions: list[Action]) -> DensePlan | None:
    """The edits that make the `dense` sites of `actions` dense, or None when there are none; an
    InputError (one line) where the result would not be the mean of the original over the phases."""
    dense_sites = {id(a.site.node): a.site for a in actions if a.action == "dense"}
    if not dense_sites:
        return None
    _check_sites(g, dense_sites)
    per_phase: frozenset[int] = frozenset()
    while True:
        try:
            w = _walk(g, dense_sites, per_phase)
            break
        except _SplitPools as split:
            per_phase |= split.pools
    by_id = {id(v): v for node in g for v in node.outputs if v is not None}
    return DensePlan(w.edits, [by_id[i] for i in w.maps if i in by_id], len(per_phase), w.heads)


def apply(g: ir.Graph, dense: DensePlan) -> None:
    """Make the edits of `dense` in `g`; the dense values lose their (now wrong) shapes."""
    for value in dense.dense_values:
        value.shape = None
    for edit in dense.edits:
        node = edit.node
        if edit.build is not None:
            edit.build(g)
            continue
        if edit.op_type is not None:
            node.op_type = edit.op_type
            node.attributes.clear()
        for name, values in edit.attributes.items():
            node.attributes[name] = ir.convenience.convert_attribute(name, values)
        if edit.attributes and "auto_pad" in node.attributes:
            node.attributes["auto_pad"] = ir.AttrString("auto_pad", "NOTSET")
        if edit.attributes.get("strides") and node.attributes.get_int("ceil_mode", 0):
            node.attributes["ceil_mode"] = ir.AttrInt64("ceil_mode", 0)  # stride 1: no partial windows
        for index, array in edit.inputs.items():
            old = node.inputs[index] if index < len(node.inputs) else None
            base = node.name or (old.name if old is not None else "dense")
            value = dense_nodes.constant(g, f"{base}.dense_{index}", array)
            if index >= len(node.inputs):
                node.resize_inputs(index + 1)
            node.replace_input_with(index, value)
            if old is not None and old.is_initializer() and not old.uses() and not old.is_graph_input():
                g.initializers.pop(old.name)
