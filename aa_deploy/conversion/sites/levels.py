"""Which resolution level each site subsamples: the product of the strides between the input and it.

Sites at the same level subsample maps of the same resolution (a stage transition's strided conv and
its strided shortcut are one level); the last levels of a classifier are where dense sampling
(`convert --dense-last N`) runs at stride 1 instead.
"""

from __future__ import annotations

import math

from aa_deploy.conversion.sites.site import Site


def site_levels(sites: list[Site]) -> list[int]:
    """For each site, the total subsampling factor (area) of the map it reads, propagated through its
    graph in topological order from the graph inputs (factor 1); a node that reads maps of several
    levels takes the coarsest. Sites of one graph only (the main graph's; bodies count from 1)."""
    factors: dict[int, int] = {}
    by_node = {id(s.node): s for s in sites}
    for g in {id(s.node.graph): s.node.graph for s in sites}.values():
        for node in g:
            level = max((factors.get(id(v), 1) for v in node.inputs if v is not None), default=1)
            site = by_node.get(id(node))
            out = level * math.prod(site.strides) if site is not None else level
            for v in node.outputs:
                factors[id(v)] = out
    return [factors.get(id(s.value), 1) for s in sites]
