"""Applying a plan to an onnx_ir graph: insert blur nodes, rewire readers, restride blurpool sites.

    pre:       X -> site(stride s)            becomes  X -> blur(stride 1) -> site(stride s)
               X -> Conv1x1(stride s)         becomes  X -> blur(stride s) -> Conv1x1(stride 1)  (same numbers)
    blurpool:  X -> site(stride s) -> Y       becomes  X -> site(stride 1) -> blur(stride s) -> Y

Blurs take the AveragePool form where that is exact (reflect/replicate padding, binomial taps; see
`blur_nodes`): a bias commutes with it (the blur of a constant is that constant), so a Conv keeps
its bias. In the Conv form with zero padding it would not at the borders, so there a blurpool
Conv's bias moves onto the blur, which then acts on the convolution alone: exact under any padding
when BatchNorm has been folded into the Conv.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from aa_deploy.conversion.blur_nodes import BlurBuilder, pool_chain
from aa_deploy.conversion.plan import Action


def _dtype(action: Action) -> np.dtype:
    for value in (
        action.site.value,
        *(n.inputs[1] for n in action.site.readers if len(n.inputs) > 1 and n.inputs[1] is not None),
    ):
        if value.dtype is not None and value.dtype.is_floating_point():
            return value.dtype.numpy()
    return np.dtype(np.float32)


def _insert(g: ir.Graph, after: ir.Node | None, nodes: list[ir.Node]) -> None:
    if after is not None and after.graph is g:
        g.insert_after(after, nodes)
    else:
        g.insert_before(next(iter(g)), nodes)


def _pre(builder: BlurBuilder, action: Action, blurred: ir.Value | None) -> ir.Value:
    site = action.site
    if blurred is None:
        nodes, blurred = builder.build(site.value, action.spec, _dtype(action))
        _insert(site.node.graph, site.value.producer(), nodes)
    if action.restride:
        site.node.attributes["strides"] = ir.AttrInt64s("strides", [1] * (site.rank - 2))
    for reader in site.readers:
        for index, value in enumerate(reader.inputs):
            if value is site.value:
                reader.replace_input_with(index, blurred)
    return blurred


def _blurpool(builder: BlurBuilder, action: Action) -> None:
    node = action.site.node
    g = node.graph
    n = action.site.rank - 2
    node.attributes["strides"] = ir.AttrInt64s("strides", [1] * n)
    bias = None
    pooled = pool_chain(action.spec, _dtype(action)) is not None  # a bias commutes with it exactly: keep it
    if not pooled and node.op_type == "Conv" and len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = node.inputs[2]
        node.replace_input_with(2, None)
        node.resize_inputs(2)
    out = node.outputs[0]
    uses = list(out.uses())
    outputs = [i for i, v in enumerate(g.outputs) if v is out]
    nodes, blurred = builder.build(out, action.spec, _dtype(action), bias=bias)
    g.insert_after(node, nodes)
    for use in uses:
        use.node.replace_input_with(use.idx, blurred)
    if outputs:
        name = out.name
        out.name, blurred.name = blurred.name, name
        for i in outputs:
            g.outputs[i] = blurred
    blurred.shape, blurred.type = out.shape, out.type
    out.shape = None  # the stride-1 map is larger than the old output


def rewrite(g: ir.Graph, actions: list[Action]) -> int:
    """Apply `actions` to `g` (and the If/Loop/Scan bodies their sites are in) in place; returns the
    number of blurs inserted. Blur constants are initializers of `g`, visible in every body."""
    builder = BlurBuilder(g)
    blurred: dict[int, ir.Value] = {}
    for i, action in enumerate(actions):
        if action.action == "pre":
            shared = blurred.get(action.shared_with) if action.shared_with is not None else None
            blurred[i] = _pre(builder, action, shared)
        elif action.action == "blurpool":
            _blurpool(builder, action)
    return builder.count
