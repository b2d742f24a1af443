"""Finding downsampling sites: one module per site kind, each `find(graph, claimed) -> list[Site]`.

A site module also holds its kind's rules: what is not a site (`pooling.acts_globally`), when a
form applies (`strided_conv.is_pointwise`) and the words for why not (`pooling.CEIL_MODE`,
`strided_slice.BLURPOOL_OBSTACLE`). `plan` and the PyTorch twin both ask them; the decisions made
from them (skips, modes, notes) are `plan.skip_reason` and `plan.site_mode`, also used by both.
A new site kind is one module here plus its entry in FINDERS (and one test module).
"""

from __future__ import annotations

import onnx_ir as ir

from aa_deploy.conversion.sites import patch_merge, pooling, strided_conv, strided_slice
from aa_deploy.conversion.sites.site import Site

# Patch merging first: it claims the Slices it explains, so they are not counted again as strided slices.
FINDERS = (patch_merge.find, strided_conv.find, pooling.find, strided_slice.find)


def graphs(g: ir.Graph):
    """`g`, then the bodies of its If/Loop/Scan nodes (recursively), in graph order."""
    yield g
    for node in g:
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                yield from graphs(attr.as_graph())
            elif attr.type == ir.AttributeType.GRAPHS:
                for body in attr.as_graphs():
                    yield from graphs(body)


def find_sites(g: ir.Graph) -> list[Site]:
    """All downsampling sites: the main graph's in graph (topological) order, then those inside
    If/Loop/Scan bodies (detection post-processing, resolution branches), body by body."""
    sites: list[Site] = []
    for body in graphs(g):
        claimed: set[int] = set()
        found = [site for finder in FINDERS for site in finder(body, claimed)]
        order = {id(node): i for i, node in enumerate(body)}
        sites += sorted(found, key=lambda s: order[id(s.node)])
    return sites


__all__ = ["FINDERS", "Site", "find_sites", "graphs"]
