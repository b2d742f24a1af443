"""Which teacher tensor each student conv, classifier and residual sum is fitted against.

A student converted from this very teacher keeps its tensor names, and they match by name. The same
network exported another way (TorchScript's exporter against dynamo's, or renamed by a tool) does not:
its layers then match by graph structure, each Conv and Gemm by its weight's shape and its depth (the
most Convs and Gemms on a path from the input) and each Add by its depth, in graph order among equals.
The nodes aa-deploy inserted (blurs and their glue) count for nothing, so a converted student has the
skeleton of its teacher."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from aa_deploy.common import graph
from aa_deploy.common.inserted import is_inserted
from aa_deploy.converters.bridge import OnnxModule

LAYERS = ("Conv", "Gemm")  # what adds to a node's depth
ANCHORS = (*LAYERS, "Add")  # the nodes whose outputs calibration fits against


@dataclass(frozen=True)
class Counterparts:
    """Student tensor name -> teacher tensor name for the outputs of the anchors; `by` says how they were
    matched (names or structure); `convs`: the student's trainable convs, `matched`: how many of them have a
    counterpart."""

    names: dict[str, str]
    by: str
    convs: int
    matched: int


def _skeleton(module: OnnxModule, skip_inserted: bool) -> dict[str, tuple]:
    """Output name of each anchor -> (op, weight shape, depth, ordinal among equals)."""
    depth: dict[str, int] = {}
    seen: dict[tuple, int] = defaultdict(int)
    found = {}
    for node in module.nodes:
        d = max((depth.get(v.name, 0) for v in node.inputs if v is not None), default=0)
        inserted = skip_inserted and is_inserted(node)
        if node.op_type in ANCHORS and not inserted and node.outputs:
            weight = graph.const_array(node.inputs[1]) if node.op_type in LAYERS and len(node.inputs) > 1 else None
            shape = None if weight is None else tuple(weight.shape)
            d += node.op_type in LAYERS
            key = (node.op_type, shape, d)
            found[node.outputs[0].name] = (*key, seen[key])
            seen[key] += 1
        for v in node.outputs:
            depth[v.name] = d
    return found


def trainable_convs(module: OnnxModule) -> list:
    """The Conv nodes whose weight calibration fits, in graph order: not those after a dense site, whose
    weights are the original's and whose maps are denser than the teacher's (they have no counterpart)."""
    trainable = module.trainable()
    return [
        n
        for n in module.nodes
        if n.op_type == "Conv"
        and n.inputs[1] is not None
        and n.inputs[1].name in trainable
        and n.name not in module.dense_nodes
    ]


def counterparts(student: OnnxModule, teacher: OnnxModule) -> Counterparts:
    """The teacher tensors the student's anchors are fitted against: by name where every trainable conv
    of the student has its namesake in the teacher, else by structure when that matches more convs."""
    convs = [node.outputs[0].name for node in trainable_convs(student)]
    ours = _skeleton(student, skip_inserted=True)
    teachers = _skeleton(teacher, skip_inserted=False)
    # A namesake counts when it is the same kind of layer with the same weight shape: a teacher of
    # other widths or another class count shares names but not layers.
    by_name = {
        name: name
        for name in ours
        if name in teacher.computed and (name not in teachers or teachers[name][:2] == ours[name][:2])
    }
    named = sum(name in by_name for name in convs)
    if named == len(convs):
        return Counterparts(by_name, "names", len(convs), named)
    theirs = {key: name for name, key in teachers.items()}
    by_structure = {name: theirs[key] for name, key in ours.items() if key in theirs}
    matched = sum(name in by_structure for name in convs)
    if matched > named:
        return Counterparts(by_structure, "structure", len(convs), matched)
    return Counterparts(by_name, "names", len(convs), named)
