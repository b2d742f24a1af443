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

from aa_deploy.common.errors import InputError
from aa_deploy.converters import bridge

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

# Every case the bridge refuses, by the words of its refusal: what calibration does not run (modes of
# Resize beyond nearest/linear/cubic half-pixel upsampling by sizes, the statistics outputs of
# LayerNormalization, MaxPool's indices, training-mode BatchNorm, ScatterND's max/min/mul reductions).
# A refusal not listed here fails, and so does a
# listed case that runs (take it off the list).
EXPECTED_REFUSALS = {
    "BatchNormalization in training mode": {
        "batchnorm_epsilon_training_mode",
        "batchnorm_example_training_mode",
    },
    "LayerNormalization's Mean / InvStdDev outputs": {
        "layer_normalization_2d_axis0",
        "layer_normalization_2d_axis1",
        "layer_normalization_2d_axis_negative_1",
        "layer_normalization_2d_axis_negative_2",
        "layer_normalization_3d_axis0_epsilon",
        "layer_normalization_3d_axis1_epsilon",
        "layer_normalization_3d_axis2_epsilon",
        "layer_normalization_3d_axis_negative_1_epsilon",
        "layer_normalization_3d_axis_negative_2_epsilon",
        "layer_normalization_3d_axis_negative_3_epsilon",
        "layer_normalization_4d_axis0",
        "layer_normalization_4d_axis1",
        "layer_normalization_4d_axis2",
        "layer_normalization_4d_axis3",
        "layer_normalization_4d_axis_negative_1",
        "layer_normalization_4d_axis_negative_2",
        "layer_normalization_4d_axis_negative_3",
        "layer_normalization_4d_axis_negative_4",
        "layer_normalization_default_axis",
    },
    "MaxPool's indices output": {
        "maxpool_with_argmax_2d_precomputed_pads",
        "maxpool_with_argmax_2d_precomputed_strides",
    },
    "Resize mode": {
        "resize_downsample_scales_cubic_A_n0p5_exclude_outside",
        "resize_downsample_scales_cubic_align_corners",
        "resize_downsample_scales_cubic_antialias",
        "resize_downsample_scales_linear_align_corners",
        "resize_downsample_scales_linear_antialias",
        "resize_downsample_scales_linear_half_pixel_symmetric",
        "resize_downsample_scales_nearest",
        "resize_downsample_sizes_cubic_antialias",
        "resize_downsample_sizes_linear_antialias",
        "resize_downsample_sizes_linear_pytorch_half_pixel",
        "resize_downsample_sizes_nearest",
        "resize_downsample_sizes_nearest_not_larger",
        "resize_downsample_sizes_nearest_not_smaller",
        "resize_tf_crop_and_resize",
        "resize_tf_crop_and_resize_axes_2_3",
        "resize_tf_crop_and_resize_axes_3_2",
        "resize_tf_crop_and_resize_extrapolation_value",
        "resize_upsample_scales_cubic_A_n0p5_exclude_outside",
        "resize_upsample_scales_cubic_asymmetric",
        "resize_upsample_scales_linear_half_pixel_symmetric",
        "resize_upsample_scales_nearest",
        "resize_upsample_scales_nearest_axes_2_3",
        "resize_upsample_scales_nearest_axes_3_2",
        "resize_upsample_sizes_nearest",
        "resize_upsample_sizes_nearest_axes_2_3",
        "resize_upsample_sizes_nearest_axes_3_2",
        "resize_upsample_sizes_nearest_ceil_half_pixel",
        "resize_upsample_sizes_nearest_floor_align_corners",
        "resize_upsample_sizes_nearest_not_larger",
        "resize_upsample_sizes_nearest_not_smaller",
        "resize_upsample_sizes_nearest_round_prefer_ceil_asymmetric",
    },
    "ScatterND reduction": {
        "scatternd_max",
        "scatternd_max_with_element_indices",
        "scatternd_min",
        "scatternd_min_with_element_indices",
        "scatternd_multiply",
    },
}


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


def test_the_listed_refusals_are_cases_of_this_onnx():
    ids = {case.id for case in CASES}
    listed = set().union(*EXPECTED_REFUSALS.values())
    assert listed <= ids, sorted(listed - ids)
    assert len(listed) < len(ids) / 8  # refusals stay the exception


def test_there_are_cases_for_the_ops_that_matter():
    ops = {n.op_type for model, *_ in (c.values for c in CASES) for n in model.graph.node}
    assert len(CASES) > 500
    assert {"Conv", "MaxPool", "AveragePool", "Flatten", "Softmax", "Pad", "Clip", "Resize", "Slice"} <= ops


@pytest.mark.parametrize(("model", "inputs", "expected"), CASES)
def test_bridge_reproduces_the_onnx_node_case_or_refuses_it(model, inputs, expected, request):
    case_id = request.node.callspec.id
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            outputs = _run(model, inputs)
        except InputError as e:
            reasons = [words for words, ids in EXPECTED_REFUSALS.items() if case_id in ids]
            assert reasons, f"refused, and not a listed refusal: {e}"
            assert "\n" not in str(e) and reasons[0] in str(e), str(e)
            return
    listed = [words for words, ids in EXPECTED_REFUSALS.items() if case_id in ids]
    assert not listed, f"listed as refused ({listed[0]}) but ran: take it off EXPECTED_REFUSALS"
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
