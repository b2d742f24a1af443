"""Finding downsampling sites: one module per site kind, each `find(graph, claimed) -> list[Site]`.

A new site kind is one module here plus its entry in FINDERS (and one test module).
"""

from __future__ import annotations

import onnx_ir as ir

from aa_deploy.sites import patch_merge, pooling, strided_conv, strided_slice
from aa_deploy.sites.site import Site

# Patch merging first: it claims the Slices it explains, so they are not counted again as strided slices.
FINDERS = (patch_merge.find, strided_conv.find, pooling.find, strided_slice.find)


def find_sites(g: ir.Graph) -> list[Site]:
    """All downsampling sites of the main graph, in graph (topological) order."""
    claimed: set[int] = set()
    sites = [site for finder in FINDERS for site in finder(g, claimed)]
    order = {id(node): i for i, node in enumerate(g)}
    return sorted(sites, key=lambda s: order[id(s.node)])


__all__ = ["FINDERS", "Site", "find_sites"]
