"""The blur after the activation (Zhang's and timm's placement in MobileNet-style nets), as a measurement.

    aa-deploy convert model.onnx --mode blurpool -o model.bp.onnx
    python benchmarks/blur_after_activation.py model.bp.onnx -o model.ba.onnx
    aa-deploy calibrate model.ba.onnx --teacher model.onnx --images DIR --preprocess pre.json -o model.ba.cal.onnx

`convert --mode blurpool` runs each strided conv at stride 1 and subsamples through the blur:
conv(stride 1) -> blur(stride s) -> activation. This script moves every such blur behind the pointwise
activation that reads it: conv(stride 1) -> activation -> blur(stride s), so that the blur never sits in
front of the nonlinearity. Without a blur (taps [1]) both placements compute the original exactly (an
activation commutes with subsampling); with one they differ. A site whose blur is not read by exactly one
pointwise activation is left as it is and named. A hypothesis measured in docs/results.md, not a mode of
`convert`. Calibrate such a graph with the default `distill` (its start rescales the moved spatial convs):
`--method reconstruct` and `--start reconstruct` refuse it in one line, since a moved conv's output is the
stride-1 map, not the teacher's.
"""

from __future__ import annotations

import argparse
import sys

import onnx_ir as ir

from aa_deploy.common import model_io
from aa_deploy.common.atomic import refuse_overwrite
from aa_deploy.common.errors import InputError
from aa_deploy.common.inserted import MARK

POINTWISE = ("Relu", "Clip", "LeakyRelu", "HardSigmoid", "HardSwish", "Sigmoid", "Tanh", "Elu", "Selu", "Gelu")


def _blur_chain(node: ir.Node) -> list[ir.Node]:
    """The blur nodes aa-deploy inserted after `node` (a blurpool site), in order; [] when none."""
    chain, value = [], node.outputs[0]
    while True:
        uses = list(value.uses())
        if len(uses) != 1 or not uses[0].node.metadata_props.get(MARK):
            return chain
        chain.append(uses[0].node)
        value = uses[0].node.outputs[0]


def move_blurs(model: ir.Model) -> tuple[list[str], list[str]]:
    """Move each blurpool site's blur behind the activation that reads it, in place. Returns the sites
    moved and those left as they were (with why)."""
    g = model.graph
    moved, left = [], []
    names = model_io.sites_where(model, "blurpool")
    for node in [n for n in g if n.name in names]:
        chain = _blur_chain(node)
        readers = list(chain[-1].outputs[0].uses()) if chain else []
        act = readers[0].node if len(readers) == 1 else None
        if act is None or act.op_type not in POINTWISE or any(v in g.outputs for v in act.outputs):
            left.append(f"{node.name}: its blur is not read by one pointwise activation")
            continue
        blurred, act_out = chain[-1].outputs[0], act.outputs[0]
        later = list(act_out.uses())
        act.replace_input_with(0, node.outputs[0])
        chain[0].replace_input_with(0, act_out)
        for use in later:
            use.node.replace_input_with(use.idx, blurred)
        g.remove(act)
        g.insert_after(node, act)
        blurred.shape, blurred.type = act_out.shape, act_out.type
        act_out.shape = None  # the stride-1 map now
        moved.append(node.name)
    return moved, left


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a model converted with --mode blurpool")
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args()
    try:
        refuse_overwrite(args.output, args.model)
        model = model_io.load(args.model)
        moved, left = move_blurs(model)
        if not moved:
            raise InputError(
                f"{args.model}: no blurpool site with an activation after its blur (convert --mode blurpool)"
            )
        model_io.save(model, args.output, external=model_io.uses_external_data(model))
    except InputError as e:
        sys.exit(f"error: {e}")
    print(f"moved {len(moved)} blurs behind their activation; left {len(left)}")
    for why in left:
        print(f"  {why}")


if __name__ == "__main__":
    main()
