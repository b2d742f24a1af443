"""Graphs users already have: ONNX Model Zoo-era opsets (7-9) with IR version 3, and sites inside
If/Loop bodies.

The reference is the one of test_sites: in `pre` mode, a site reading the graph input X satisfies
converted(X) == original(np_blur(X)), the original run as it is (old opset) in ONNX Runtime.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from aa_deploy.common import model_io
from tests import graphs as G
from tests.helpers import cli

RNG = np.random.default_rng(0)


def zoo_era_model(opset: int) -> onnx.ModelProto:
    """X -> Conv(s2) -> Relu -> LRN -> Dropout, plus X -> MaxPool(s2), summed: the classic CNN ops,
    IR version 3, weights as initializers that are also listed as graph inputs (as IR 3 requires)."""
    w = RNG.standard_normal((3, 3, 3, 3)).astype(np.float32)
    b = RNG.standard_normal(3).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["X", "w", "b"], ["c"], strides=[2, 2], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c"], ["r"], name="relu1"),
        helper.make_node("LRN", ["r"], ["n"], size=3, name="norm1"),
        helper.make_node("Dropout", ["n"], ["d"], name="drop1", **({"is_test": 1} if opset < 7 else {})),
        helper.make_node("MaxPool", ["X"], ["p"], kernel_shape=[2, 2], strides=[2, 2], name="pool1"),
        helper.make_node("Sum", ["d", "p"], ["Y"], name="sum1"),
    ]
    inputs = [
        G.inp("X", [1, 3, 16, 16]),
        helper.make_tensor_value_info("w", TensorProto.FLOAT, w.shape),
        helper.make_tensor_value_info("b", TensorProto.FLOAT, b.shape),
    ]
    out = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 3, 8, 8])
    g = helper.make_graph(nodes, "zoo", inputs, [out], [G.const("w", w), G.const("b", b)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 3
    onnx.checker.check_model(m)
    return m


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("opset", [7, 8, 9])
@pytest.mark.parametrize("filt", ["rect", "triangle"])  # rect: Conv-form blurs with new initializers
def test_zoo_era_graph_is_upgraded_converted_and_exact(tmp_path, opset, filt):
    m = zoo_era_model(opset)
    src, dst = tmp_path / "old.onnx", tmp_path / "old.aa.onnx"
    src.write_bytes(m.SerializeToString())
    proc = cli("convert", src, "-o", dst, "--mode", "pre", "--filter", filt, "--blur-stem")
    assert proc.returncode == 0, proc.stderr
    assert f"upgraded the graph from opset {opset} to 11" in proc.stdout
    assert "changed 2 of 2 sites" in proc.stdout

    out = onnx.load(dst)
    onnx.checker.check_model(out, full_check=True)
    assert out.ir_version == 3 and out.opset_import[0].version == 11
    # IR 3: every initializer (the blur taps included) is a graph input; the model's own come first.
    assert {i.name for i in out.graph.initializer} <= {i.name for i in out.graph.input}
    assert [i.name for i in out.graph.input][:3] == ["X", "w", "b"]
    assert [o.name for o in out.graph.output] == ["Y"]
    assert model_io.read_metadata(out)["opset_upgrade"] == {"from": opset, "to": 11}
    session = _session(dst)
    assert [i.name for i in session.get_inputs()] == ["X"]

    x = RNG.standard_normal((1, 3, 16, 16)).astype(np.float32)
    original = _session(src)
    expected = original.run(None, {"X": G.np_blur(x, (2, 3), filt)})[0]
    np.testing.assert_allclose(session.run(None, {"X": x})[0], expected, rtol=1e-5, atol=1e-5)
    assert np.abs(original.run(None, {"X": x})[0] - expected).max() > 1e-3


def test_target_opset_and_default_mode(tmp_path):
    src, dst = tmp_path / "old.onnx", tmp_path / "old.aa.onnx"
    src.write_bytes(zoo_era_model(8).SerializeToString())
    proc = cli("convert", src, "-o", dst, "--target-opset", "13")
    assert proc.returncode == 0, proc.stderr
    out = onnx.load(dst)
    onnx.checker.check_model(out, full_check=True)
    assert out.opset_import[0].version == 13
    assert _session(dst).run(None, {"X": np.zeros((1, 3, 16, 16), np.float32)})[0].shape == (1, 3, 8, 8)
    proc = cli("inspect", src)
    assert proc.returncode == 0 and "upgraded the graph from opset 8 to 11" in proc.stdout


def test_an_upgrade_that_fails_is_one_line(tmp_path):
    m = G.conv_model([1, 3, 16, 16])
    m.opset_import[0].version = 9
    m.graph.node[0].output[0] = "c"
    m.graph.node.append(helper.make_node("NoSuchOp", ["c"], ["Y"]))
    src = tmp_path / "bad.onnx"
    src.write_bytes(m.SerializeToString())
    proc = cli("convert", src, "-o", tmp_path / "out.onnx")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "cannot upgrade opset 9 to 11" in proc.stderr, proc.stderr
    assert "NoSuchOp" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out.onnx").exists()
    proc = cli("convert", tmp_path / "bad.onnx", "-o", tmp_path / "out.onnx", "--target-opset", "9")
    assert proc.returncode == 2 and "needs opset 11" in proc.stderr


def _branch(name: str, node: onnx.NodeProto) -> onnx.GraphProto:
    return helper.make_graph([node], name, [], [G.out(node.output[0], 4)])


def if_model() -> onnx.ModelProto:
    """Y = If(C, then: Conv(X, s2), else: MaxPool(X, s2)): both bodies read X from the outer graph."""
    w = RNG.standard_normal((3, 3, 3, 3)).astype(np.float32)
    then = _branch("then", helper.make_node("Conv", ["X", "w"], ["t"], strides=[2, 2], pads=[1] * 4, name="conv"))
    other = _branch("else", helper.make_node("MaxPool", ["X"], ["e"], kernel_shape=[2, 2], strides=[2, 2], name="mp"))
    node = helper.make_node("If", ["C"], ["Y"], then_branch=then, else_branch=other, name="branch")
    cond = helper.make_tensor_value_info("C", TensorProto.BOOL, [])
    return G.model([node], [G.inp("X", [1, 3, 16, 16]), cond], [G.out("Y", 4)], [G.const("w", w)])


@pytest.mark.parametrize("filt", ["rect", "triangle"])
def test_sites_inside_if_bodies(filt):
    m = if_model()
    converted, result = G.convert(m, filter=filt, mode="pre")
    assert sorted((a.site.kind, a.action) for a in result.actions) == [("max-pool", "pre"), ("strided-conv", "pre")]
    assert result.blurs == 2  # one per body: a blur serves the graph it is in
    x = RNG.standard_normal((1, 3, 16, 16)).astype(np.float32)
    new, old = (ort.InferenceSession(p.SerializeToString()) for p in (converted, m))
    for cond in (True, False):
        c = np.array(cond)
        expected = old.run(None, {"X": G.np_blur(x, (2, 3), filt), "C": c})[0]
        np.testing.assert_allclose(new.run(None, {"X": x, "C": c})[0], expected, rtol=1e-5, atol=1e-5)
        assert np.abs(old.run(None, {"X": x, "C": c})[0] - expected).max() > 1e-3


def test_sites_inside_a_loop_body_default_mode():
    # Loop body: y = MaxPool(X) each iteration, scanned out; default (auto) mode puts a blurpool in the body.
    body_nodes = [
        helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        helper.make_node("MaxPool", ["X"], ["p"], kernel_shape=[2, 2], strides=[2, 2], name="mp"),
    ]
    body = helper.make_graph(
        body_nodes,
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), G.out("p", 4)],
    )
    trip = G.ints("trip", 2)
    node = helper.make_node("Loop", ["trip", ""], ["Y"], body=body, name="loop")
    m = G.model([node], [G.inp("X", [1, 3, 16, 16])], [G.out("Y", 5)], [trip])
    converted, result = G.convert(m)
    assert [(a.site.kind, a.action) for a in result.actions] == [("max-pool", "blurpool")]
    x = RNG.standard_normal((1, 3, 16, 16)).astype(np.float32)
    y = ort.InferenceSession(converted.SerializeToString()).run(None, {"X": x})[0]
    # MaxBlurPool: max pool at stride 1, then the blur at stride 2 (reflect padding).
    windows = np.lib.stride_tricks.sliding_window_view(x, (2, 2), axis=(2, 3)).max(axis=(-1, -2))
    expected = G.np_blur(windows, (2, 3), "triangle", "reflect", stride=2)
    assert y.shape == (2, 1, 3, 8, 8)
    np.testing.assert_allclose(y[0, 0], expected[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y[1], y[0], rtol=0, atol=0)


def zoo_classifier(opset: int) -> onnx.ModelProto:
    """A classic-zoo-style classifier: IR 3, opset `opset`, the weights listed as graph inputs *before*
    the image (as AlexNet, ResNet-50 and the rest are distributed). Conv(s2) -> Relu -> MaxPool(s2) ->
    GlobalAveragePool -> Flatten -> Gemm."""
    w = RNG.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3
    b = RNG.standard_normal(8).astype(np.float32) * 0.1
    fc = RNG.standard_normal((5, 8)).astype(np.float32)
    fc_b = np.zeros(5, np.float32)
    nodes = [
        helper.make_node("Conv", ["data", "w", "b"], ["c"], strides=[2, 2], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c"], ["r"], name="relu1"),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2], name="pool1"),
        helper.make_node("GlobalAveragePool", ["p"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "fc", "fc_b"], ["prob"], transB=1, name="fc1"),
    ]
    return _zoo_model(nodes, [("w", w), ("b", b), ("fc", fc), ("fc_b", fc_b)], opset)


def _zoo_model(nodes, weights, opset: int, out_shape=(1, 5)) -> onnx.ModelProto:
    """A graph as the zoo distributes it: IR 3, the weights listed as graph inputs before the image `data`
    (1 x 3 x 32 x 32), the output `prob` (`out_shape`)."""
    inputs = [
        helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(a.dtype), a.shape) for n, a in weights
    ]
    inputs.append(G.inp("data", [1, 3, 32, 32]))
    out = helper.make_tensor_value_info("prob", TensorProto.FLOAT, list(out_shape))
    g = helper.make_graph(nodes, "zoo", inputs, [out], [G.const(n, a) for n, a in weights])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 3
    onnx.checker.check_model(m)
    return m


def _calibrate_on_photo_crops(conv, src, cal, size=32):
    """`calibrate --method stats` of `conv` against `src` on 24 crops of the bundled photos (`size` px)."""
    from PIL import Image

    from aa_deploy.common import bundled

    images = cal.parent / "images"
    images.mkdir()
    for i, crop in enumerate(bundled.photo_crops(24, size)):
        Image.fromarray(crop).save(images / f"{i}.png")
    return cli("calibrate", conv, "--teacher", src, "--images", images, "--method", "stats", "-o", cal)


@pytest.mark.parametrize("opset", [7, 9])
def test_calibrate_runs_on_a_zoo_graph_whose_weights_come_before_the_image(tmp_path, opset):
    """The image input is found by what it is (the one input that is no initializer), not by position."""
    src, conv, cal = tmp_path / "zoo.onnx", tmp_path / "zoo.aa.onnx", tmp_path / "zoo.cal.onnx"
    src.write_bytes(zoo_classifier(opset).SerializeToString())
    assert cli("convert", src, "-o", conv, "--blur-stem", "--no-drift").returncode == 0
    proc = _calibrate_on_photo_crops(conv, src, cal)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = onnx.load(cal)
    assert [i.name for i in out.graph.input][:5] == ["w", "b", "fc", "fc_b", "data"]
    x = RNG.standard_normal((1, 3, 32, 32)).astype(np.float32)
    assert np.isfinite(_session(cal).run(None, {"data": x})[0]).all()


def test_calibrate_trains_weights_written_as_constant_nodes(tmp_path):
    """paddle2onnx and some zoo graphs write their weights as Constant nodes, not initializers: calibrate
    makes them initializers and calibrates them (once: nothing to fit, and `max()` of no tensors)."""
    rng = np.random.default_rng(1)
    w1, w2 = (rng.standard_normal(s).astype(np.float32) for s in ((8, 3, 3, 3), (8, 8, 3, 3)))
    nodes = [
        helper.make_node("Constant", [], ["w1"], value=G.const("w1v", w1), name="k1"),
        helper.make_node("Constant", [], ["w2"], value=G.const("w2v", w2), name="k2"),
        helper.make_node("Conv", ["x", "w1"], ["c1"], strides=[2, 2], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], strides=[2, 2], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["y"], name="relu2"),
    ]
    g = helper.make_graph(nodes, "paddle", [G.inp("x", [1, 3, 32, 32])], [G.out("y", 4)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 9)])
    src, conv, cal = tmp_path / "p.onnx", tmp_path / "p.aa.onnx", tmp_path / "p.cal.onnx"
    onnx.save(m, str(src))
    assert cli("convert", src, "-o", conv, "--no-drift").returncode == 0
    proc = _calibrate_on_photo_crops(conv, src, cal)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 trainable convs" in proc.stdout and "2 rescaled" in proc.stdout, proc.stdout
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(cal)).graph.initializer}
    lifted = [a for a in weights.values() if a.shape == w2.shape]
    assert len(lifted) == 1 and not np.allclose(lifted[0], w2)
    x = RNG.standard_normal((1, 3, 32, 32)).astype(np.float32)
    assert np.isfinite(_session(cal).run(None, {"x": x})[0]).all()


def zoo_inception_block(opset: int) -> onnx.ModelProto:
    """GoogLeNet/AlexNet-era ops as the zoo distributes them (IR 3, weights listed first): Conv(s2) -> Relu ->
    LRN -> MaxPool(3, s2) padded at the end only -> [1x1 Conv | AveragePool(3, s1, pads excluded) -> 1x1 Conv]
    -> Concat -> Reshape to a fixed [1, 512] (AlexNet's [1, 9216]) -> Gemm."""
    weights = [
        ("w1", RNG.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3),
        ("wa", RNG.standard_normal((4, 8, 1, 1)).astype(np.float32) * 0.3),
        ("wb", RNG.standard_normal((4, 8, 1, 1)).astype(np.float32) * 0.3),
        ("fc", RNG.standard_normal((5, 512)).astype(np.float32) * 0.05),
        ("fc_b", np.zeros(5, np.float32)),
        ("shape", np.asarray([1, 512], np.int64)),
    ]
    nodes = [
        helper.make_node("Conv", ["data", "w1"], ["c"], strides=[2, 2], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c"], ["r"], name="relu1"),
        helper.make_node("LRN", ["r"], ["n"], size=5, alpha=1e-4, beta=0.75, name="norm1"),
        helper.make_node("MaxPool", ["n"], ["p"], kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 1, 1], name="pool1"),
        helper.make_node("Conv", ["p", "wa"], ["a"], name="branch_a"),
        helper.make_node("AveragePool", ["p"], ["q"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="pool_b"),
        helper.make_node("Conv", ["q", "wb"], ["b"], name="branch_b"),
        helper.make_node("Concat", ["a", "b"], ["cat"], axis=1, name="concat"),
        helper.make_node("Reshape", ["cat", "shape"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc", "fc_b"], ["prob"], transB=1, name="fc1"),
    ]
    return _zoo_model(nodes, weights, opset)


@pytest.mark.parametrize("opset", [7, 9])
def test_calibrate_runs_on_an_inception_era_zoo_block(tmp_path, opset):
    """End-only pool pads, LRN, a branch concat and a fixed-size Reshape: the constructs behind the zoo
    CNNs' 'Sizes of tensors must match' and "shape '[1, 9216]' is invalid" run, checked against ONNX
    Runtime before the refit, and the result runs in ONNX Runtime."""
    src, conv, cal = tmp_path / "zoo.onnx", tmp_path / "zoo.aa.onnx", tmp_path / "zoo.cal.onnx"
    src.write_bytes(zoo_inception_block(opset).SerializeToString())
    assert cli("convert", src, "-o", conv, "--blur-stem", "--no-drift").returncode == 0
    proc = _calibrate_on_photo_crops(conv, src, cal)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 rescaled" in proc.stdout, proc.stdout
    x = RNG.standard_normal((1, 3, 32, 32)).astype(np.float32)
    assert np.isfinite(_session(cal).run(None, {"data": x})[0]).all()


def test_calibrate_runs_on_a_paddle2onnx_graph(tmp_path):
    """A graph paddle2onnx wrote (tests/assets: PaddleOCR's direction-classifier architecture): converted
    with defaults, calibrated, every trainable conv matched and rescaled, the result run in ONNX Runtime."""
    from pathlib import Path

    src = Path(__file__).parents[1] / "assets" / "paddle_cls.onnx"
    conv, cal = tmp_path / "cls.aa.onnx", tmp_path / "cls.cal.onnx"
    assert cli("convert", src, "-o", conv, "--no-drift").returncode == 0
    proc = _calibrate_on_photo_crops(conv, src, cal, size=64)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "matched by names for all 52 trainable convs" in proc.stdout and "52 rescaled" in proc.stdout, proc.stdout
    x = RNG.standard_normal((2, 3, 64, 64)).astype(np.float32)
    before, after = (_session(p).run(None, {"x": x})[0] for p in (conv, cal))
    assert after.shape == (2, 2) and np.isfinite(after).all() and not np.allclose(before, after)


def zoo_squeezenet_block(opset: int) -> onnx.ModelProto:
    """SqueezeNet as the zoo distributes it (squeezenet1.x-7: IR 3, weights listed first): Conv(s2) -> Relu ->
    MaxPool(3, s2) -> a fire module (1x1 squeeze, 1x1 and 3x3 expands, Concat) -> Dropout with its mask
    output -> 1x1 classifier Conv -> Relu -> AveragePool over the whole map -> Softmax of the 4-D
    (1, classes, 1, 1) map, the opset-7 Softmax that flattens from axis 1."""
    weights = [
        ("w1", RNG.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3),
        ("b1", RNG.standard_normal(8).astype(np.float32) * 0.1),
        ("ws", RNG.standard_normal((4, 8, 1, 1)).astype(np.float32) * 0.3),
        ("we1", RNG.standard_normal((6, 4, 1, 1)).astype(np.float32) * 0.3),
        ("we3", RNG.standard_normal((6, 4, 3, 3)).astype(np.float32) * 0.3),
        ("wc", RNG.standard_normal((5, 12, 1, 1)).astype(np.float32) * 0.3),
        ("bc", RNG.standard_normal(5).astype(np.float32) * 0.1),
    ]
    nodes = [
        helper.make_node("Conv", ["data", "w1", "b1"], ["c"], strides=[2, 2], name="conv1"),
        helper.make_node("Relu", ["c"], ["r"], name="relu1"),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[3, 3], strides=[2, 2], name="pool1"),
        helper.make_node("Conv", ["p", "ws"], ["sq"], name="fire2/squeeze1x1"),
        helper.make_node("Relu", ["sq"], ["sqr"], name="fire2/relu_squeeze1x1"),
        helper.make_node("Conv", ["sqr", "we1"], ["e1"], name="fire2/expand1x1"),
        helper.make_node("Conv", ["sqr", "we3"], ["e3"], pads=[1, 1, 1, 1], name="fire2/expand3x3"),
        helper.make_node("Concat", ["e1", "e3"], ["cat"], axis=1, name="fire2/concat"),
        helper.make_node("Dropout", ["cat"], ["drop", "mask"], ratio=0.5, name="drop9"),
        helper.make_node("Conv", ["drop", "wc", "bc"], ["cls"], name="conv10"),
        helper.make_node("Relu", ["cls"], ["clsr"], name="relu_conv10"),
        helper.make_node("AveragePool", ["clsr"], ["pooled"], kernel_shape=[7, 7], name="pool10"),
        helper.make_node("Softmax", ["pooled"], ["prob"], name="softmax"),
    ]
    return _zoo_model(nodes, weights, opset, out_shape=(1, 5, 1, 1))


@pytest.mark.parametrize("opset", [7, 9])
def test_calibrate_runs_on_a_squeezenet_era_zoo_graph(tmp_path, opset):
    """The zoo SqueezeNet's constructs (Dropout's mask, a whole-map AveragePool, a 4-D opset-7 Softmax):
    calibrate's execution agrees with ONNX Runtime's (checked before the refit), and the result runs."""
    src, conv, cal = tmp_path / "zoo.onnx", tmp_path / "zoo.aa.onnx", tmp_path / "zoo.cal.onnx"
    src.write_bytes(zoo_squeezenet_block(opset).SerializeToString())
    assert cli("convert", src, "-o", conv, "--blur-stem", "--no-drift").returncode == 0
    proc = _calibrate_on_photo_crops(conv, src, cal)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    x = RNG.standard_normal((1, 3, 32, 32)).astype(np.float32)
    y = _session(cal).run(None, {"data": x})[0]
    assert y.shape == (1, 5, 1, 1) and np.isclose(y.sum(), 1.0, atol=1e-5)


def test_calibrate_runs_on_the_zoo_squeezenet_of_the_onnx_wheel(tmp_path):
    """The ONNX Model Zoo's SqueezeNet as the onnx wheel carries it (opset 9, IR 3; synthetic weights whose
    logits reach 1e9, where float32 rounding decides the softmax): the bridge's logits equal ONNX
    Runtime's, so calibrate takes it, and its output runs in ONNX Runtime."""
    src = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / "light_squeezenet.onnx"
    conv, cal = tmp_path / "sq.aa.onnx", tmp_path / "sq.cal.onnx"
    assert cli("convert", src, "-o", conv, "--no-drift").returncode == 0
    proc = _calibrate_on_photo_crops(conv, src, cal, size=224)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    session = _session(cal)
    x = RNG.standard_normal((1, 3, 224, 224)).astype(np.float32)
    assert session.run(None, {session.get_inputs()[0].name: x})[0].shape == (1, 1000, 1, 1)


def test_a_softmax_the_bridge_gets_wrong_is_still_refused(tmp_path, monkeypatch):
    """Logits of an ordinary scale agree to far less than a softmax can notice: an output mismatch there is
    the Softmax's own (here a deliberately wrong one), and the check still refuses it."""
    import torch

    from aa_deploy.common.errors import InputError
    from aa_deploy.converters import bridge
    from aa_deploy.converters.bridge_check import check_against_onnxruntime

    rng = np.random.default_rng(0)
    weights = {"w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3}
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["c"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Softmax", ["f"], ["y"], axis=1),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [onnx.numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    module = bridge.OnnxModule(model_io.load(path))
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    assert check_against_onnxruntime(path, module, x) <= 1e-4
    monkeypatch.setattr(bridge.OnnxModule, "_op_Softmax", lambda self, node, t: torch.softmax(2 * t, dim=1))
    with pytest.raises(InputError, match="differs from ONNX Runtime"):
        check_against_onnxruntime(path, module, x)
