"""The `Site` record: one place in a graph where a feature map is subsampled."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import onnx_ir as ir

from aa_deploy.common import graph

# What subsamples at a site: the one type every module that asks a site's kind uses.
SiteKind = Literal["strided-conv", "max-pool", "average-pool", "strided-slice", "patch-merge"]
SITE_KINDS: tuple[str, ...] = get_args(SiteKind)


@dataclass(eq=False)
class Site:
    """One downsampling site.

    `value` is the tensor that gets subsampled; `readers` are the nodes of this site that read it
    (the ones rewired to the blurred tensor in `pre` mode); `node` is the node that subsamples.
    Axes index `value`'s own dims; `channel_axis` is 1 (channels-first) or rank - 1 (channels-last).
    """

    kind: SiteKind
    node: ir.Node
    value: ir.Value
    readers: tuple[ir.Node, ...]
    axes: tuple[int, ...]
    strides: tuple[int, ...]
    channel_axis: int
    rank: int
    channels: int | None
    sizes: tuple[int | None, ...]  # static sizes of `axes` in `value`, None where dynamic
    blurpool: str | None = None  # why blurpool mode cannot apply here (None: it can)
    protected: bool = False  # already preceded by a fixed blur
    out_channels: int | None = None  # channels of the node's output: what a blurpool-mode blur filters
    stride1_sizes: tuple[int | None, ...] | None = (
        None  # `sizes` of the node's output at stride 1 (blurpool's blur input)
    )
    pointwise: bool = False  # a 1x1 conv without padding (`strided_conv.is_pointwise`)
    form: str | None = None  # the pattern a patch merge was found as (Slice+Concat, Reshape+Transpose, SpaceToDepth)

    def __post_init__(self) -> None:
        if self.kind not in SITE_KINDS:
            raise ValueError(f"unknown site kind {self.kind!r} (one of {', '.join(SITE_KINDS)})")

    @property
    def name(self) -> str:
        return self.node.name or ""

    @property
    def op(self) -> str:
        return self.node.op_type

    @property
    def layout(self) -> str:
        spatial = "DHW"[-(self.rank - 2) :] if self.rank <= 5 else "S" * (self.rank - 2)
        return ("NC" + spatial) if self.channel_axis == 1 else ("N" + spatial + "C")

    @property
    def scope(self) -> str:
        return graph.module_scope(self.node)

    def describe(self) -> dict:
        """JSON-friendly description (what `inspect` and the metadata record)."""
        return {
            "kind": self.kind,
            "node": self.name,
            "op": self.op,
            "scope": self.scope,
            "tensor": self.value.name,
            "axes": list(self.axes),
            "stride": list(self.strides),
            "channels": self.channels,
            "layout": self.layout,
        }


def look_through_pad(value: ir.Value, readers: tuple[ir.Node, ...]) -> tuple[ir.Value, tuple[ir.Node, ...]]:
    """(value, readers) moved in front of a Pad that only `readers` read.

    Exporters turn a module's own padding (`padding_mode='reflect'`, `F.pad(x, (0, 0, 0, W % 2, ...))`
    in patch merging) into a Pad node; the blur belongs in front of it, where the PyTorch twin puts it.
    """
    pad = value.producer()
    if graph.is_onnx(pad, "Pad") and not value.is_graph_output() and graph.dims(pad.inputs[0]) is not None:
        if set(map(id, graph.unique_consumers(value))) <= set(map(id, readers)):
            return pad.inputs[0], (pad,)
    return value, readers
