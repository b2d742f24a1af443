"""Constant subgraphs folded to initializers, so that every shape that is static for the graph's input
size is known before dense sampling's analysis.

Exporters compute some constants at run time: the TorchScript exporter writes the pads of a
TF-"same" convolution as ConstantOfShape -> Concat -> Reshape -> Slice -> Transpose -> Cast, and
ONNX shape inference does not evaluate that chain, so every map after such a Pad has an unknown
size. The onnxscript optimizer's constant folding (`FoldConstantsPass`, the pass torch's own
exporter runs) evaluates them with ONNX's reference implementation and keeps the names of the
values it replaces. Two of its defaults are relaxed: a ConstantOfShape with a small constant shape
is folded (it keeps those by default to keep files small; these are a handful of pad values), while
Q/DQ nodes stay as they are (folding a DequantizeLinear of a weight would undo quantization).
Nodes left without a use are removed.
"""

from __future__ import annotations

import math

import onnx_ir as ir
import onnx_ir.passes.common as ir_passes

from aa_deploy.common import graph

SMALL = 1024  # elements: what a ConstantOfShape may produce to be folded


def _should_fold(node: ir.Node) -> bool | None:
    if graph.is_onnx(node, "ConstantOfShape"):
        shape = graph.const_array(node.inputs[0])
        return shape is not None and math.prod(int(d) for d in shape.reshape(-1)) <= SMALL
    if graph.is_onnx(node, "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"):
        return False
    return None


def fold_constants(model: ir.Model) -> int:
    """Fold `model`'s constant subgraphs in place; how many nodes the graph lost."""
    from onnxscript.optimizer import fold_constants as onnxscript_fold

    before = sum(1 for _ in model.graph.all_nodes())
    onnxscript_fold(model, should_fold=_should_fold)
    ir_passes.RemoveUnusedNodesPass()(model)
    return before - sum(1 for _ in model.graph.all_nodes())
