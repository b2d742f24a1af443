"""Strided slice sites: `Slice(step s > 1)` on spatial axes, e.g. the option-A shortcut `x[:, :, ::2, ::2]`.

    Slice(step s) [-> Slice(step s) on another axis ...] -> blur at stride 1, then the same Slices

Exporters emit one Slice per axis, so a chain of strided Slices (each the only reader of the last)
is one site over the union of their axes. Layout: strided axes within 2..r-1 read as channels-first,
within 1..r-2 as channels-last (channels-first where both fit, e.g. one strided axis 2 of a 4-D map).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from aa_deploy import blur_nodes, graph
from aa_deploy.sites.site import Site


@dataclass
class Chain:
    """Strided Slices applied one after another to `source`."""

    source: ir.Value
    nodes: list[ir.Node]
    strides: dict[int, int]  # axis -> total step

    @property
    def output(self) -> ir.Value:
        return self.nodes[-1].outputs[0]


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


def chain_from(node: ir.Node) -> Chain | None:
    """The chain of strided Slices that starts at `node` (None if `node` is not a strided Slice)."""
    steps = slice_steps(node)
    if steps is None:
        return None
    chain = Chain(node.inputs[0], [node], dict(steps))
    while True:
        readers = graph.unique_consumers(chain.output)
        if len(readers) != 1 or chain.output.is_graph_output():
            return chain
        more = slice_steps(readers[0])
        if more is None:
            return chain
        chain.nodes.append(readers[0])
        for axis, step in more.items():
            chain.strides[axis] = chain.strides.get(axis, 1) * step


def starts_chain(node: ir.Node) -> bool:
    """True for a strided Slice that does not continue a chain begun upstream."""
    if slice_steps(node) is None:
        return False
    producer = node.inputs[0].producer()
    return producer is None or slice_steps(producer) is None or len(graph.unique_consumers(node.inputs[0])) != 1


def layout(rank: int, axes: tuple[int, ...], prefer_last: bool = False) -> int | None:
    """The channel axis under which `axes` are all spatial, or None if they cannot be."""
    first = rank >= 3 and all(2 <= a <= rank - 1 for a in axes)
    last = rank >= 3 and all(1 <= a <= rank - 2 for a in axes)
    if first and last:
        return rank - 1 if prefer_last else 1
    return 1 if first else (rank - 1 if last else None)


def site_for(
    kind: str, node: ir.Node, value: ir.Value, readers: tuple[ir.Node, ...], strides: dict[int, int], channel_axis: int
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
        blurpool="subsampling by slicing: its blurpool form is the pre form",
        protected=blur_nodes.reads_blurred(value),
    )


def find(g: ir.Graph, claimed: set[int]) -> list[Site]:
    """Every chain of strided Slices over spatial axes not already claimed by a patch merge."""
    sites = []
    for node in g:
        if id(node) in claimed or not starts_chain(node):
            continue
        chain = chain_from(node)
        rank = len(graph.dims(chain.source))
        channel_axis = layout(rank, tuple(chain.strides))
        if channel_axis is None:
            continue
        sites.append(site_for("strided-slice", node, chain.source, (node,), chain.strides, channel_axis))
    return sites
