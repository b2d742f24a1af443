"""The ONNX -> PyTorch executor against ONNX's own node conformance cases (onnx.backend.test.case.node).

Every case of the installed onnx whose ops the bridge claims and whose first input is a float32
tensor (the image-like input calibration feeds; the case's other inputs become initializers, as
weights are): the bridge must reproduce the expected outputs within 1e-4 of their scale, or refuse
the case in one line (an InputError naming the mode it does not run). Integer-only, string and
bfloat16 cases are outside what calibration runs.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper
from onnx.backend.test.case.node import collect_testcases

from aa_deploy.converters import bridge
from aa_deploy.errors import InputError

CLAIMED = set(bridge._ELEMENTWISE) | {name[4:] for name in dir(bridge.OnnxModule) if name.startswith("_op_")}


def _float_input_cases():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = collect_testcases(None)
    for case in cases:
        if case.model is None or not case.model.graph.input or not case.data_sets:
            continue
        if any(n.domain not in ("", "ai.onnx") or n.op_type not in CLAIMED for n in case.model.graph.node):
            continue
        inputs, outputs = case.data_sets[0]
        arrays = [np.asarray(v) for v in inputs] if all(isinstance(v, np.ndarray) for v in inputs) else None
        if not arrays or arrays[0].dtype != np.float32 or any(a.dtype.kind in "OSU" for a in arrays):
            continue
        if any(str(a.dtype) == "bfloat16" for a in arrays) or not all(isinstance(o, np.ndarray) for o in outputs):
            continue
        yield pytest.param(case.model, arrays, outputs, id=case.name.removeprefix("test_"))


CASES = list(_float_input_cases())


def _run(model: onnx.ModelProto, inputs: list[np.ndarray]) -> list[np.ndarray]:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for info, value in zip(list(m.graph.input[1:]), inputs[1:]):
        m.graph.initializer.append(numpy_helper.from_array(value, info.name))
    module = bridge.OnnxModule(ir.serde.deserialize_model(m)).eval()
    with torch.no_grad():  # the first output as calibration reads it; every output by capture
        first = module(torch.from_numpy(inputs[0].copy()))
        _, captured = module(torch.from_numpy(inputs[0].copy()), capture=set(module.output_names))
    outs = [first, *(captured.get(name) for name in module.output_names[1:])]
    return [o.numpy() if isinstance(o, torch.Tensor) else np.asarray(o) for o in outs]


def test_there_are_cases_for_the_ops_that_matter():
    ops = {n.op_type for model, *_ in (c.values for c in CASES) for n in model.graph.node}
    assert len(CASES) > 500
    assert {"Conv", "MaxPool", "AveragePool", "Flatten", "Softmax", "Pad", "Clip", "Resize", "Slice"} <= ops


@pytest.mark.parametrize(("model", "inputs", "expected"), CASES)
def test_bridge_reproduces_the_onnx_node_case_or_refuses_it(model, inputs, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            outputs = _run(model, inputs)
        except InputError as e:
            assert "\n" not in str(e) and "not supported" in str(e) or "cannot run" in str(e)
            return
    assert len(outputs) >= len(expected)
    for got, want in zip(outputs, expected):
        assert got.shape == want.shape
        if want.dtype.kind == "f":
            finite = np.isfinite(want)
            scale = max(1.0, float(np.abs(want[finite]).max())) if finite.any() else 1.0
            np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=0, atol=1e-4 * scale)
        else:
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("opset", [6, 9, 11])
def test_old_opset_softmax_and_clip_match_onnxruntime(opset):
    """Below opset 13 Softmax normalizes over every axis from `axis` (default 1) on; below 11 Clip's
    bounds are attributes."""
    clip = (
        helper.make_node("Clip", ["s"], ["Y"], min=0.05, max=0.2)
        if opset < 11
        else helper.make_node("Clip", ["s", "lo", "hi"], ["Y"])
    )
    inits = (
        []
        if opset < 11
        else [numpy_helper.from_array(np.float32(0.05), "lo"), numpy_helper.from_array(np.float32(0.2), "hi")]
    )
    g = helper.make_graph(
        [helper.make_node("Softmax", ["X"], ["s"]), clip],
        "g",
        [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [2, 3, 4, 5])],
        [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [2, 3, 4, 5])],
        inits,
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32) * 3
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]
    got = _run(model, [x])[0]
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert np.abs(got - want).max() < 1e-6 and 0.05 < got.mean() < 0.2  # the bounds really applied
