"""Pooling sites: `MaxPool` / `AveragePool` with stride > 1.

MaxPool -> MaxPool(stride 1) then blur(stride s) (MaxBlurPool, the default for pooling); AveragePool
likewise. Not sites: GlobalAveragePool/GlobalMaxPool, and a pool whose window covers its whole
static input (a global pool in disguise).
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir

from aa_deploy.common import graph, inserted
from aa_deploy.conversion.sites.site import Site
from aa_deploy.conversion.sites.strided_conv import strided_site

CEIL_MODE = "ceil_mode=1"  # why a pool keeps the pre form: its stride-1 output has other sizes


def acts_globally(kernel: Sequence[int], sizes: Sequence[int | None], pads: Sequence[int]) -> bool:
    """Whether the pool's window covers its whole padded input on every axis (`pads`: begins, then
    ends): a global pool in disguise, which subsamples nothing and is no site."""
    n = len(kernel)
    return all(size is not None and k >= size + pads[i] + pads[i + n] for i, (k, size) in enumerate(zip(kernel, sizes)))


def _is_global(node: ir.Node, kernel: tuple[int, ...]) -> bool:
    x = graph.dims(node.inputs[0])
    return x is not None and acts_globally(kernel, x[2:], graph.ints(node, "pads", [0] * (2 * len(kernel))))


def _blurpool_obstacle(node: ir.Node) -> str | None:
    if node.attributes.get_int("ceil_mode", 0):
        return CEIL_MODE
    if (
        len(node.outputs) > 1
        and node.outputs[1] is not None
        and (node.outputs[1].consumers() or node.outputs[1].is_graph_output())
    ):
        return "MaxPool indices are used"
    return None


def find(g: ir.Graph, claimed: set[int]) -> list[Site]:
    """Every strided, non-global MaxPool and AveragePool of `g`."""
    sites = []
    for node in g:
        if not graph.is_onnx(node, "MaxPool", "AveragePool") or id(node) in claimed or inserted.is_fixed_blur(node):
            continue
        kernel = graph.ints(node, "kernel_shape")
        if kernel is None or _is_global(node, kernel):
            continue
        kind = "max-pool" if node.op_type == "MaxPool" else "average-pool"
        site = strided_site(node, kind, kernel)
        if site is None:
            continue
        x = graph.dims(node.inputs[0])
        site.channels = x[1] if x is not None and len(x) > 1 else None
        site.out_channels = site.channels
        site.blurpool = site.blurpool or _blurpool_obstacle(node)
        sites.append(site)
    return sites
