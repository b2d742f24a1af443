"""Patch-merging sites (space-to-depth), channels-first or channels-last:

    Slice(step 2) x k -> Concat(channel axis)      (torchvision Swin)    -> blur, then the same
    Reshape(rank 6) -> Transpose -> Reshape        (timm Swin, NHWC/NCHW) -> blur, then the same
    SpaceToDepth(blocksize b)                                             -> blur, then the same

A Pad that only these nodes read is looked through (see `look_through_pad`).
"""

from __future__ import annotations

import onnx_ir as ir

from aa_deploy.common import graph
from aa_deploy.conversion.sites import strided_slice
from aa_deploy.conversion.sites.site import Site, look_through_pad


def _slice_concat(node: ir.Node) -> tuple[Site, list[ir.Node]] | None:
    paths = [strided_slice.path_to_source(v) for v in node.inputs if v is not None]
    if len(paths) < 2 or any(not nodes for _, _, nodes in paths):
        return None
    source, strides, _ = paths[0]
    if any(src is not source or steps != strides for src, steps, _ in paths):
        return None
    x = graph.dims(source)
    if x is None:
        return None
    rank = len(x)
    concat_axis = node.attributes.get_int("axis", 0) % rank
    channel_axis = strided_slice.layout(rank, tuple(strides), prefer_last=concat_axis == rank - 1)
    if channel_axis != concat_axis:
        return None
    readers = tuple(dict.fromkeys(nodes[-1] for _, _, nodes in paths))
    value, readers = look_through_pad(source, readers)
    site = strided_slice.site_for("patch-merge", node, value, readers, strides, channel_axis)
    site.form = "Slice+Concat"
    return site, [n for _, _, nodes in paths for n in nodes]


def _gathers_into_channels(transpose: ir.Node, channel_axis: int, merged: int) -> bool:
    """True when the Reshape after `transpose` folds the s x s cells into the channel axis.

    A window partition has the same Reshape and Transpose but folds the windows into the batch.
    """
    readers = graph.unique_consumers(transpose.outputs[0])
    if len(readers) != 1 or not graph.is_onnx(readers[0], "Reshape", "Flatten"):
        return False
    out = graph.dims(readers[0].outputs[0])
    if (out is None or len(out) != 4) and graph.is_onnx(readers[0], "Reshape"):
        target = graph.const_array(readers[0].inputs[1])
        out = None if target is None else tuple(int(d) for d in target)
    return out is not None and len(out) == 4 and out[channel_axis] == merged


def _reshape_transpose(node: ir.Node) -> tuple[Site, list[ir.Node]] | None:
    x = graph.dims(node.inputs[0])
    out = graph.dims(node.outputs[0])
    if out is None or len(out) != 6:
        target = graph.const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        out = None if target is None or target.size != 6 else tuple(int(d) for d in target)
    if x is None or len(x) != 4 or out is None:
        return None
    readers = graph.unique_consumers(node.outputs[0])
    if len(readers) != 1 or not graph.is_onnx(readers[0], "Transpose"):
        return None
    perm = graph.ints(readers[0], "perm", range(5, -1, -1))
    # Space-to-depth keeps the coarse axes next to the batch and gathers the s-sized axes with the
    # channels; a window partition (Swin's attention) does the opposite and is not a site.
    if out[2] == out[4] and out[2] is not None and out[2] > 1 and x[3] is not None and out[5] == x[3]:
        channel_axis, stride = 3, out[2]  # (B, H/s, s, W/s, s, C)
        merges = set(perm[:3]) == {0, 1, 3} and set(perm[3:]) == {2, 4, 5}
    elif out[3] == out[5] and out[3] is not None and out[3] > 1 and x[1] is not None and out[1] == x[1]:
        channel_axis, stride = 1, out[3]  # (B, C, H/s, s, W/s, s)
        merges = perm[0] == 0 and set(perm[1:4]) == {1, 3, 5} and set(perm[4:]) == {2, 4}
    else:
        return None
    if not merges or not _gathers_into_channels(readers[0], channel_axis, stride * stride * x[channel_axis]):
        return None
    axes = (1, 2) if channel_axis == 3 else (2, 3)
    value, site_readers = look_through_pad(node.inputs[0], (node,))
    site = strided_slice.site_for("patch-merge", node, value, site_readers, dict.fromkeys(axes, stride), channel_axis)
    site.form = "Reshape+Transpose"
    return site, [node]


def _space_to_depth(node: ir.Node) -> tuple[Site, list[ir.Node]] | None:
    x = graph.dims(node.inputs[0])
    b = node.attributes.get_int("blocksize", 1)
    if x is None or len(x) != 4 or b < 2:
        return None
    site = strided_slice.site_for("patch-merge", node, node.inputs[0], (node,), {2: b, 3: b}, 1)
    site.form = "SpaceToDepth"
    return site, [node]


def find(g: ir.Graph, claimed: set[int]) -> list[Site]:
    """Every patch merge of `g`; claims the nodes it explains so other finders skip them."""
    sites = []
    for node in g:
        if graph.is_onnx(node, "Concat"):
            found = _slice_concat(node)
        elif graph.is_onnx(node, "Reshape"):
            found = _reshape_transpose(node)
        elif graph.is_onnx(node, "SpaceToDepth"):
            found = _space_to_depth(node)
        else:
            continue
        if found is not None:
            site, nodes = found
            claimed.update(map(id, nodes))
            sites.append(site)
    return sites
