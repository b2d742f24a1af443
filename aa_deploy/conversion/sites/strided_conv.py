"""Strided convolution sites: `Conv(stride s > 1)` of any rank and group count -> blur at stride 1, then Conv.

Not sites: stride-1 Convs, ConvTranspose (upsampling), and fixed blurs themselves (a strided blur is
an already anti-aliased downsampler).
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir

from aa_deploy.common import graph, inserted
from aa_deploy.conversion.sites.site import Site, SiteKind, look_through_pad


def _channels(node: ir.Node) -> int | None:
    """Input channels: weight dim 1 times group, else the input's static dim 1."""
    weight = graph.dims(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is not None and len(weight) >= 3 and weight[1] is not None:
        return weight[1] * node.attributes.get_int("group", 1)
    x = graph.dims(node.inputs[0])
    return x[1] if x is not None and len(x) > 1 else None


def _spatial_rank(node: ir.Node) -> int | None:
    kernel = graph.ints(node, "kernel_shape")
    if kernel is not None:
        return len(kernel)
    weight = graph.dims(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is not None:
        return len(weight) - 2
    x = graph.dims(node.inputs[0])
    return None if x is None else len(x) - 2


def is_pointwise(kernel: Sequence[int], pads: Sequence[int]) -> bool:
    """A 1x1 conv without padding mixes channels only, so it commutes with the blur: its blurpool form
    equals its pre form, which runs the conv on a quarter of the pixels."""
    return bool(kernel) and all(k == 1 for k in kernel) and not any(pads)


def strided_site(node: ir.Node, kind: SiteKind, kernel: tuple[int, ...] | None) -> Site | None:
    """A Site for a channels-first strided node (Conv or pooling), or None when nothing is strided."""
    n = _spatial_rank(node) if kernel is None else len(kernel)
    if n is None:
        return None
    strides = graph.ints(node, "strides", [1] * n)
    if all(s == 1 for s in strides):
        return None
    x = node.inputs[0]
    x_dims = graph.dims(x)
    axes = tuple(2 + i for i, s in enumerate(strides) if s > 1)
    sizes = tuple(x_dims[a] if x_dims is not None and a < len(x_dims) else None for a in axes)
    kernel = kernel or graph.ints(node, "kernel_shape") or tuple((graph.dims(node.inputs[1]) or ())[2:])
    pads = graph.ints(node, "pads", [0] * (2 * n))
    dilations = graph.ints(node, "dilations", [1] * n)
    # Sizes of the map the same node produces at stride 1: what a blurpool-mode blur reads.
    stride1 = tuple(
        None
        if size is None or not kernel
        else size + pads[a - 2] + pads[a - 2 + n] - dilations[a - 2] * (kernel[a - 2] - 1)
        for a, size in zip(axes, sizes)
    )
    auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
    return Site(
        kind=kind,
        node=node,
        value=x,
        readers=(node,),
        axes=axes,
        strides=tuple(strides[a - 2] for a in axes),
        channel_axis=1,
        rank=n + 2,
        channels=None,
        sizes=sizes,
        blurpool=None if auto_pad in ("NOTSET", "") else f"auto_pad={auto_pad}",
        protected=inserted.reads_blurred(x),
        stride1_sizes=stride1,
        pointwise=is_pointwise(kernel, pads),
    )


def find(g: ir.Graph, claimed: set[int]) -> list[Site]:
    """Every strided Conv of `g` that is not itself a blur."""
    sites = []
    for node in g:
        if not graph.is_onnx(node, "Conv") or id(node) in claimed or inserted.is_fixed_blur(node):
            continue
        site = strided_site(node, "strided-conv", None)
        if site is not None:
            site.channels = _channels(node)
            site.value, site.readers = look_through_pad(site.value, site.readers)
            site.protected = site.protected or inserted.reads_blurred(site.value)
            weight = graph.dims(node.inputs[1]) if len(node.inputs) > 1 else None
            site.out_channels = weight[0] if weight else None
            sites.append(site)
    return sites
