"""Strided slice sites: `Slice(step s > 1)` on spatial axes, e.g. the option-A shortcut `x[:, :, ::2, ::2]`.

    Slice(step s) [-> Slice(step s) on another axis ...] -> blur at stride 1, then the same Slices

Exporters emit one Slice per axis, so a strided Slice and the strided Slices below it are one site
over the union of their axes. Layout: strided axes within 2..r-1 read as channels-first,
within 1..r-2 as channels-last (channels-first where both fit, e.g. one strided axis 2 of a 4-D map).
"""

from __future__ import annotations

import onnx_ir as ir

from aa_deploy.common import graph, inserted
from aa_deploy.conversion.sites.site import Site, SiteKind

# Why a slice (or a patch merge, which is slices) cannot take the blurpool form: the ONNX pass and the
# twin both say it with these words.
BLURPOOL_OBSTACLE = "subsampling by slicing: its blurpool form is the pre form"


def slice_steps(node: ir.Node) -> dict[int, int] | None:
    """Axis -> step for the steps > 1 of a Slice (opset >= 10 form), or None if not a strided Slice."""
    if not graph.is_onnx(node, "Slice") or len(node.inputs) < 5 or node.inputs[4] is None:
        return None
    x = graph.dims(node.inputs[0])
    steps = graph.const_array(node.inputs[4])
    axes = graph.const_array(node.inputs[3]) if node.inputs[3] is not None else None
    if x is None or steps is None:
        return None
    rank = len(x)
    axes_list = range(len(steps)) if axes is None else [int(a) % rank for a in axes.reshape(-1)]
    strided = {a: int(s) for a, s in zip(axes_list, steps.reshape(-1)) if int(s) > 1}
    return strided or None


def _merge(total: dict[int, int], more: dict[int, int]) -> dict[int, int]:
    out = dict(total)
    for axis, step in more.items():
        out[axis] = out.get(axis, 1) * step
    return out


def is_root(node: ir.Node) -> bool:
    """A strided Slice whose input does not come out of another strided Slice."""
    if slice_steps(node) is None:
        return False
    producer = node.inputs[0].producer()
    return producer is None or slice_steps(producer) is None


def tree_from(root: ir.Node) -> tuple[list[ir.Node], dict[int, int]]:
    """The strided Slices fed (directly or through each other) by `root`, and the total step per axis.

    Exporters share common prefixes (x[..., 0::2, 0::2, :] and x[..., 0::2, 1::2, :] read one Slice
    over H), so the Slices below a root form a tree; its strides are the largest path products.
    """
    nodes, strides = [root], dict(slice_steps(root))
    frontier = [(root, strides)]
    while frontier:
        node, total = frontier.pop()
        for reader in graph.unique_consumers(node.outputs[0]):
            more = slice_steps(reader)
            if more is not None and reader not in nodes:
                nodes.append(reader)
                path = _merge(total, more)
                frontier.append((reader, path))
                strides = {a: max(strides.get(a, 1), s) for a, s in (strides | path).items()}
    return nodes, strides


def path_to_source(value: ir.Value) -> tuple[ir.Value, dict[int, int], list[ir.Node]]:
    """Walk back from `value` through strided Slices: (source, total steps, the Slices on the way)."""
    steps: dict[int, int] = {}
    nodes: list[ir.Node] = []
    producer = value.producer()
    while producer is not None and slice_steps(producer) is not None:
        steps = _merge(steps, slice_steps(producer))
        nodes.append(producer)
        value = producer.inputs[0]
        producer = value.producer()
    return value, steps, nodes


def layout(rank: int, axes: tuple[int, ...], prefer_last: bool = False) -> int | None:
    """The channel axis under which `axes` are all spatial, or None if they cannot be."""
    first = rank >= 3 and all(2 <= a <= rank - 1 for a in axes)
    last = rank >= 3 and all(1 <= a <= rank - 2 for a in axes)
    if first and last:
        return rank - 1 if prefer_last else 1
    return 1 if first else (rank - 1 if last else None)


def site_for(
    kind: SiteKind,
    node: ir.Node,
    value: ir.Value,
    readers: tuple[ir.Node, ...],
    strides: dict[int, int],
    channel_axis: int,
) -> Site:
    """A pre-only Site over `value` (channels looked up through a Pad in front when needed)."""
    x = graph.dims(value)
    rank = len(x)
    channels = x[channel_axis]
    producer = value.producer()
    if channels is None and graph.is_onnx(producer, "Pad"):
        before = graph.dims(producer.inputs[0])
        channels = before[channel_axis] if before is not None and len(before) == rank else None
    axes = tuple(sorted(strides))
    return Site(
        kind=kind,
        node=node,
        value=value,
        readers=readers,
        axes=axes,
        strides=tuple(strides[a] for a in axes),
        channel_axis=channel_axis,
        rank=rank,
        channels=channels,
        sizes=tuple(x[a] for a in axes),
        blurpool=BLURPOOL_OBSTACLE,
        protected=inserted.reads_blurred(value),
    )


def find(g: ir.Graph, claimed: set[int]) -> list[Site]:
    """Every chain of strided Slices over spatial axes not already claimed by a patch merge."""
    sites = []
    for node in g:
        if id(node) in claimed or not is_root(node):
            continue
        _, strides = tree_from(node)
        rank = len(graph.dims(node.inputs[0]))
        channel_axis = layout(rank, tuple(strides))
        if channel_axis is None:
            continue
        sites.append(site_for("strided-slice", node, node.inputs[0], (node,), strides, channel_axis))
    return sites
