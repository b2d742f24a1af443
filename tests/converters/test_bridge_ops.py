"""The calibration bridge runs each ONNX op as ONNX Runtime does: one small graph per op (opsets 11,
13 and 18), and the bundled trained ResNet-20 as torch's TorchScript exporter writes it (its option-A
shortcut padding becomes Shape/ConstantOfShape/Cast/Concat arithmetic at run time)."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import aa_deploy
from aa_deploy.common import bundled
from aa_deploy.converters.bridge import load_module

RNG = np.random.default_rng(0)
X = RNG.standard_normal((2, 4, 8, 8)).astype(np.float32)


def _const(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def _graph(nodes, inits=(), opset=13, out_shape=None):
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(X.shape))],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, out_shape)],
        list(inits),
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


N = helper.make_node
W3 = RNG.standard_normal((4, 2, 3, 3)).astype(np.float32)
CASES = {
    "Split-13 + Sum": _graph(
        [N("Split", ["X", "s"], ["a", "b"], axis=1), N("Sum", ["a", "b", "a"], ["Y"])], [_const("s", [2, 2])]
    ),
    "Split-18 num_outputs + Mean/Max/Min": _graph(
        [
            N("Split", ["X"], ["a", "b"], axis=1, num_outputs=2),
            N("Mean", ["a", "b"], ["m"]),
            N("Max", ["a", "m"], ["h"]),
            N("Min", ["h", "b"], ["Y"]),
        ],
        opset=18,
    ),
    "Expand + Where + Greater": _graph(
        [
            N("Expand", ["c", "shape"], ["e"]),
            N("Greater", ["X", "e"], ["g"]),
            N("Where", ["g", "X", "e"], ["Y"]),
        ],
        [
            _const("c", np.float32([[0.1], [0.2], [0.3], [0.4]]).reshape(4, 1, 1)),
            _const("shape", np.int64([2, 4, 8, 8])),
        ],
    ),
    "GatherND": _graph(
        [N("Transpose", ["X"], ["t"], perm=[1, 0, 2, 3]), N("GatherND", ["t", "i"], ["Y"])],
        [_const("i", np.int64([[3], [1]]))],
    ),
    "Resize nearest asymmetric floor": _graph(
        [
            N(
                "Resize",
                ["X", "", "sc"],
                ["Y"],
                mode="nearest",
                coordinate_transformation_mode="asymmetric",
                nearest_mode="floor",
            )
        ],
        [_const("sc", np.float32([1, 1, 2, 2]))],
    ),
    "Resize linear half_pixel (sizes)": _graph(
        [N("Resize", ["X", "", "", "sz"], ["Y"], mode="linear")], [_const("sz", np.int64([2, 4, 13, 13]))]
    ),
    "Resize linear align_corners": _graph(
        [N("Resize", ["X", "", "sc"], ["Y"], mode="linear", coordinate_transformation_mode="align_corners")],
        [_const("sc", np.float32([1, 1, 2, 2]))],
    ),
    "Resize cubic half_pixel": _graph(
        [N("Resize", ["X", "", "sc"], ["Y"], mode="cubic")], [_const("sc", np.float32([1, 1, 2, 2]))]
    ),
    "ConvTranspose stride 2": _graph(
        [N("ConvTranspose", ["X", "w", "b"], ["Y"], strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1])],
        [_const("w", W3), _const("b", np.float32([0.1, -0.2]))],
    ),
    "LRN + Dropout (opset 11)": _graph(
        [N("LRN", ["X"], ["l"], size=3, alpha=1e-2, beta=0.75, bias=1.0), N("Dropout", ["l"], ["Y", "mask"])],
        opset=11,
    ),
    "Tile + Range + Cast + Unsqueeze": _graph(
        [
            N("Range", ["r0", "r1", "r2"], ["r"]),
            N("Cast", ["r"], ["rf"], to=TensorProto.FLOAT),
            N("Unsqueeze", ["rf", "ax"], ["ru"]),
            N("Tile", ["X", "rep"], ["t"]),
            N("Add", ["t", "ru"], ["Y"]),
        ],
        [
            _const("r0", np.int64(0)),
            _const("r1", np.int64(16)),
            _const("r2", np.int64(1)),
            _const("ax", np.int64([0])),
            _const("rep", np.int64([1, 1, 1, 2])),
        ],
    ),  # fmt: skip
    "ConstantOfShape + Concat + Pad (run-time pads)": _graph(
        [
            N("Shape", ["X"], ["s"]),
            N("Gather", ["s", "zero"], ["c"]),
            N("ConstantOfShape", ["k"], ["z"], value=helper.make_tensor("v", TensorProto.INT64, [1], [0])),
            N("Concat", ["z", "c", "z", "c"], ["p"], axis=0),
            N("Cast", ["p"], ["pi"], to=TensorProto.INT64),
            N("Pad", ["X", "pi"], ["Y"]),
        ],
        [_const("zero", np.int64([0])), _const("k", np.int64([3]))],
    ),
    "Slice backwards (negative steps)": _graph(
        [N("Slice", ["X", "st", "en", "ax", "sp"], ["Y"])],
        [
            _const("st", np.int64([-1, 6])),
            _const("en", np.int64([-9223372036854775807, 0])),
            _const("ax", np.int64([3, 2])),
            _const("sp", np.int64([-1, -2])),
        ],
    ),  # fmt: skip
    "ScatterND + Mod (shifted-window masks)": _graph(
        [
            N("ScatterND", ["X", "si", "su"], ["sc"]),
            N("Mod", ["sc", "m"], ["a"], fmod=1),
            N("Mod", ["k", "n"], ["b"]),
            N("Cast", ["b"], ["bf"], to=TensorProto.FLOAT),
            N("Add", ["a", "bf"], ["Y"]),
        ],
        [
            _const("si", np.int64([[0, 1], [1, 3]])),
            _const("su", RNG.standard_normal((2, 8, 8)).astype(np.float32)),
            _const("m", np.float32(0.7)),
            _const("k", np.int64([-7, 5, 9, -3, 2, 8, -1, 4])),
            _const("n", np.int64(3)),
        ],
    ),  # fmt: skip
    "Shape-15 start/end + Squeeze + Range (dynamo's batch-size arithmetic)": _graph(
        [
            N("Shape", ["X"], ["s"], start=0, end=1),
            N("Squeeze", ["s"], ["n"]),
            N("Range", ["r0", "n", "r1"], ["r"]),
            N("Shape", ["X"], ["hw"], start=-2),
            N("Cast", ["r"], ["rf"], to=TensorProto.FLOAT),
            N("ReduceSum", ["hw"], ["t"], keepdims=0),
            N("Cast", ["t"], ["tf"], to=TensorProto.FLOAT),
            N("Reshape", ["rf", "col"], ["rc"]),
            N("Mul", ["rc", "tf"], ["m"]),
            N("Add", ["X", "m"], ["Y"]),
        ],
        [_const("r0", np.int64(0)), _const("r1", np.int64(1)), _const("col", np.int64([-1, 1, 1, 1]))],
        opset=18,
    ),
    "Einsum attention + Softmax": _graph(
        [
            N("Reshape", ["X", "shp"], ["q"]),
            N("Einsum", ["q", "q"], ["a"], equation="bhnd,bhmd->bhnm"),
            N("Softmax", ["a"], ["p"], axis=-1),
            N("Einsum", ["p", "q"], ["Y"], equation="bhnm,bhmd->bhnd"),
        ],
        [_const("shp", np.int64([2, 4, 8, 8]))],
    ),
    "Mish/Softplus/Tanh/LeakyRelu/PRelu/Elu": _graph(
        [
            N("Mish", ["X"], ["a"]),
            N("Softplus", ["a"], ["b"]),
            N("Tanh", ["b"], ["c"]),
            N("LeakyRelu", ["X"], ["d"], alpha=0.1),
            N("PRelu", ["d", "slope"], ["e"]),
            N("Elu", ["e"], ["f"]),
            N("Add", ["c", "f"], ["Y"]),
        ],
        [_const("slope", np.float32([0.2, 0.3, 0.4, 0.5]).reshape(4, 1, 1))],
        opset=18,
    ),
    "InstanceNormalization + GlobalMaxPool + ReduceMax": _graph(
        [
            N("InstanceNormalization", ["X", "sc", "bi"], ["i"]),
            N("GlobalMaxPool", ["i"], ["g"]),
            N("ReduceMax", ["i"], ["r"], axes=[2], keepdims=1),
            N("Add", ["r", "g"], ["Y"]),
        ],
        [_const("sc", np.float32([1, 2, 3, 4])), _const("bi", np.float32([0, 1, 0, 1]))],
        opset=13,
    ),
    "Abs/Log/Exp/Reciprocal/Floor/Ceil": _graph(
        [
            N("Abs", ["X"], ["a"]),
            N("Add", ["a", "one"], ["b"]),
            N("Log", ["b"], ["c"]),
            N("Exp", ["c"], ["d"]),
            N("Reciprocal", ["d"], ["e"]),
            N("Floor", ["X"], ["f"]),
            N("Ceil", ["X"], ["g"]),
            N("Sum", ["e", "f", "g"], ["Y"]),
        ],
        [_const("one", np.float32(1.0))],
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_op_matches_onnxruntime(name, tmp_path):
    model = CASES[name]
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    ref = ort.InferenceSession(str(path)).run(None, {"X": X})[0]
    _, module = load_module(path)
    with torch.no_grad():
        got = module(torch.from_numpy(X)).numpy()
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(ref).max()))


@pytest.mark.parametrize("opset", [11, 13, 17])
def test_torchscript_resnet20_converts_and_calibration_runs_it(tmp_path, opset):
    from aa_deploy.calibration.stats import calibrate_stats

    path = tmp_path / "r20.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            bundled.resnet20(), (torch.rand(2, 3, 32, 32),), str(path), dynamo=False, opset_version=opset,
            input_names=["input"], output_names=["output"], dynamic_axes={"input": {0: "n"}, "output": {0: "n"}},
        )  # fmt: skip
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert {"ConstantOfShape", "Concat"} & ops or "Pad" in ops  # the run-time padding arithmetic
    aa_deploy.convert(path, tmp_path / "r20.aa.onnx")
    images, _ = bundled.cifar_test_images()
    x = bundled.cifar_normalize(images[:20])
    for name in ("r20.onnx", "r20.aa.onnx"):
        _, module = load_module(tmp_path / name)
        with torch.no_grad():
            got = module(torch.from_numpy(x)).numpy()
        ref = ort.InferenceSession(str(tmp_path / name)).run(None, {"input": x})[0]
        assert np.abs(got - ref).max() < 1e-4 * np.abs(ref).max()
    _, teacher = load_module(tmp_path / "r20.onnx")
    _, student = load_module(tmp_path / "r20.aa.onnx")
    report = calibrate_stats(student, teacher, torch.from_numpy(x))
    assert len(report) >= 19  # every conv matched by name across the two TorchScript graphs
