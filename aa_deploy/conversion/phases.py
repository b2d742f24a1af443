"""A subset of the sampling phases: dense sampling's mean over only the phases it keeps.

`--dense-last N` computes every sampling phase of the last N levels at once, on maps that many times
denser (`dense`): 4 phases for one stride-2 level, 16 for two. `--phases diagonal` keeps the diagonal
ones of each level, (0, 0) and (1, 1): 2 of 4, 4 of 16, for about half the added compute per level. A
set of kept phases is not a denser map, so they are stacked on the batch axis instead:

    X -> Conv(stride 2, pads (b, e)) -> rest -> GlobalAveragePool -> head
    X -> Conv(stride 2, pads (b, e))         -> Concat(axis 0) -> rest -> GlobalAveragePool
      -> Conv(stride 2, pads (b - 1, e + 1)) /       -> Reshape(2, N, ...) -> ReduceMean(axis 0) -> head

Each site of a level is written once per kept phase; the copy for phase p reads its map as dense
sampling's phase p does (its padding moved p pixels toward the start, the first rows sliced off where
that padding is shorter than p; the far end zero-filled as dense sampling extends it), and the copies'
outputs follow one another on the batch axis. What comes after runs unchanged on K times the batch (a
later level's copies stack again: the counts multiply); at each pool that averages the phases in dense
sampling, the K phases leave the batch axis and are reduced as that pool reduces. Each kept phase is
exactly dense sampling's phase, so the result is the exact mean of the original over the kept phases.
The nodes come from `dense_nodes`; which sites and pools, from `dense.analyse`.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import onnx_ir as ir

from aa_deploy.common import graph
from aa_deploy.common.errors import InputError
from aa_deploy.conversion import dense_nodes
from aa_deploy.conversion.dense import AXIS_OPS, DensePlan, kernel_of
from aa_deploy.conversion.plan import Action
from aa_deploy.conversion.sites import Site, strided_slice
from aa_deploy.conversion.sites.levels import site_levels

# How a pool that averages the phases reduces the stacked ones.
PHASE_REDUCE = {
    "GlobalAveragePool": "ReduceMean",
    "AveragePool": "ReduceMean",
    "ReduceMean": "ReduceMean",
    "GlobalMaxPool": "ReduceMax",
    "MaxPool": "ReduceMax",
    "ReduceMax": "ReduceMax",
}


def _refuse(node: ir.Node, why: str) -> InputError:
    return InputError(f"--phases: {node.op_type} node {node.name!r} {why}")


def kept(strides: tuple[int, ...], which: str) -> list[tuple[int, ...]]:
    """The phases `which` keeps at a site of `strides`, phase (0, 0) first."""
    if which == "all":
        return list(itertools.product(*(range(s) for s in strides)))
    if len(set(strides)) != 1:
        raise InputError(f"--phases {which}: a site of strides {strides} has no diagonal (the strides differ)")
    return [(p,) * len(strides) for p in range(strides[0])]


def _window_site(g: ir.Graph, site: Site, phases: list[tuple[int, ...]]) -> None:
    node = site.node
    x = node.inputs[0]
    sizes = tuple(int(d) for d in graph.dims(x)[2:])
    kernel = kernel_of(node)
    n = len(kernel)
    pads = graph.explicit_pads(node, sizes, kernel)
    changed: dict = {}
    if node.op_type == "AveragePool" and not node.attributes.get_int("count_include_pad", 0):
        changed["count_include_pad"] = 1  # the zero-filled far border counts, as in dense sampling
    copies = []
    for phase in phases[1:]:
        cut = {2 + i: max(0, p - pads[i]) for i, p in enumerate(phase)}
        begins = [pads[i] - p + cut[2 + i] for i, p in enumerate(phase)]
        ends = [pads[n + i] + p for i, p in enumerate(phase)]
        source = dense_nodes.slice_start(g, x, node, cut) if any(cut.values()) else x
        suffix = "phase_" + "_".join(map(str, phase))
        copies.append(dense_nodes.window_at_phase(g, node, source, begins + ends, suffix, **changed))
    dense_nodes.stack(g, node.outputs[0], copies)


def _strided(sl: ir.Node, site: Site) -> list[tuple[int, int]]:
    """(position in its lists, axis) of each axis the Slice `sl` of `site`'s tree subsamples; a one-line
    refusal where it does so in another step than the site's."""
    rank = len(graph.dims(sl.inputs[0]))
    steps = graph.const_array(sl.inputs[4]).reshape(-1)
    axes = graph.const_array(sl.inputs[3]) if sl.inputs[3] is not None else np.arange(len(steps))
    strided = [(i, a) for i, a in enumerate(int(a) % rank for a in axes.reshape(-1)) if steps[i] > 1]
    if any(steps[i] != site.strides[site.axes.index(a)] for i, a in strided):
        raise _refuse(sl, "subsamples one axis in more than one step")
    return strided


def _slice_site(g: ir.Graph, site: Site, phases: list[tuple[int, ...]]) -> None:
    """A strided-Slice site: its tree of Slices copied once per phase, each strided Slice starting at the
    phase instead of 0; every output of the tree read outside it is stacked."""
    nodes, _ = strided_slice.tree_from(site.node)
    inside = {id(n) for n in nodes}
    stacked: dict[int, list[ir.Value]] = {id(sl): [] for sl in nodes}
    for phase in phases[1:]:
        by_axis = dict(zip((2, 3), phase))
        copied: dict[int, ir.Value] = {}
        for sl in nodes:
            starts = graph.const_array(sl.inputs[1]).reshape(-1).astype(np.int64).copy()
            for i, a in _strided(sl, site):
                starts[i] = by_axis[a]
            source = copied.get(id(sl.inputs[0].producer()), sl.inputs[0])
            copied[id(sl)] = dense_nodes.slice_at_phase(g, sl, source, starts, "phase_" + "_".join(map(str, phase)))
            stacked[id(sl)].append(copied[id(sl)])
    for sl in nodes:
        if any(id(u.node) not in inside for u in sl.outputs[0].uses()):
            dense_nodes.stack(g, sl.outputs[0], stacked[id(sl)])


def _batch_fixes(node: ir.Node, value: ir.Value) -> np.ndarray | None:
    """`node` reads `value`, whose batch axis will hold the phases: a one-line refusal where that would mix
    them; for a Reshape that writes its batch size as a number, the shape with -1 there."""
    op = node.op_type
    if op == "Reshape" and node.inputs[0] is value:
        shape = graph.const_array(node.inputs[1]).reshape(-1).astype(np.int64)
        if shape[0] in (0, -1):
            return None
        if -1 in shape[1:]:
            raise _refuse(node, "writes the batch size as a number beside a -1: the stacked phases cannot pass")
        return np.concatenate([[-1], shape[1:]])
    axes: tuple[int, ...] | None = None
    if op in AXIS_OPS:
        rank = len(graph.dims(node.inputs[0]) or ()) or 1
        axes = (node.attributes.get_int("axis", AXIS_OPS[op]) % rank,)
    elif op == "Transpose":
        perm = graph.ints(node, "perm")
        axes = (0,) if perm is not None and perm[0] != 0 else None
    elif op in ("Squeeze", "Unsqueeze") or op.startswith("Reduce"):
        axes = graph.ints(node, "axes")
        if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
            array = graph.const_array(node.inputs[1])
            axes = None if array is None else tuple(int(a) for a in array.reshape(-1))
    if axes is not None and 0 in axes:
        raise _refuse(node, "works along the batch axis, where the phases are stacked")
    return None


def stack(g: ir.Graph, actions: list[Action], plan: DensePlan, which: str) -> int:
    """Keep only the phases `which` names at the dense sites of `actions` (their region analysed by
    `plan`), in place; how many phase combinations each averaging pool now reduces. Everything is
    checked before the graph changes."""
    sites = [a.site for a in actions if a.action == "dense"]
    levels = site_levels(sites)
    order = []
    for level in sorted(set(levels)):
        at = [s for s, lv in zip(sites, levels) if lv == level]
        strides = {tuple(s.strides[s.axes.index(a)] if a in s.axes else 1 for a in (2, 3)) for s in at}
        if len(strides) != 1:
            raise _refuse(at[0].node, f"shares its level with sites of other strides {sorted(strides)}")
        order.append((at, kept(strides.pop(), which)))
    count = math.prod(len(phases) for _, phases in order)
    reshapes = [
        (use.node, shape)
        for value in plan.dense_values
        for use in list(value.uses())
        if (shape := _batch_fixes(use.node, value)) is not None
    ]
    heads = []
    for head in plan.heads:
        reduce_op = PHASE_REDUCE.get(head.op_type)
        if reduce_op is None:
            raise _refuse(head, "pools the phases by a reduction other than a mean or a max")
        out = head.outputs[0]
        dims = graph.dims(out)
        if out.is_graph_output() or dims is None or any(d is None for d in dims[1:]):
            raise _refuse(head, "pools into a graph output or a value of unknown shape")
        heads.append((head, reduce_op, [int(d) for d in dims[1:]]))
    for site in sites:
        if site.kind == "strided-slice":
            for sl in strided_slice.tree_from(site.node)[0]:
                _strided(sl, site)
    for at, phases in order:
        for site in at:
            (_slice_site if site.kind == "strided-slice" else _window_site)(g, site, phases)
    for node, shape in reshapes:
        node.replace_input_with(1, dense_nodes.constant(g, f"{node.name or 'reshape'}.phase_batch", shape))
    for head, reduce_op, dims in heads:
        dense_nodes.reduce_stacked(g, head, reduce_op, count, dims)
        head.outputs[0].shape = None
    for value in plan.dense_values:
        value.shape = None
    return count
