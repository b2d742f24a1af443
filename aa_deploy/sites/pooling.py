"""Pooling sites: `MaxPool` / `AveragePool` with stride > 1.

MaxPool -> MaxPool(stride 1) then blur(stride s) (MaxBlurPool, the default for pooling); AveragePool
likewise. Not sites: GlobalAveragePool/GlobalMaxPool, and a pool whose window covers its whole
static input (a global pool in disguise).
"""

from __future__ import annotations

import onnx_ir as ir

from aa_deploy import blur_nodes, graph
from aa_deploy.sites.site import Site
from aa_deploy.sites.strided_conv import strided_site


def _is_global(node: ir.Node, kernel: tuple[int, ...]) -> bool:
    x = graph.dims(node.inputs[0])
    if x is None or any(d is None for d in x[2:]):
        return False
    n = len(kernel)
    pads = graph.ints(node, "pads", [0] * (2 * n))
    return all(k >= size + pads[i] + pads[i + n] for i, (k, size) in enumerate(zip(kernel, x[2:])))


def _blurpool_obstacle(node: ir.Node) -> str | None:
    if node.attributes.get_int("ceil_mode", 0):
        return "ceil_mode=1"
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
        if not graph.is_onnx(node, "MaxPool", "AveragePool") or id(node) in claimed or blur_nodes.is_fixed_blur(node):
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
        site.extra["out_channels"] = site.channels
        site.blurpool = site.blurpool or _blurpool_obstacle(node)
        sites.append(site)
    return sites
