"""INT8 by explicit Q/DQ on ONNX Runtime CPU: parity with fp32, blurs kept exact."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from PIL import Image

import aa_deploy
from aa_deploy.common import bundled
from aa_deploy.converters.export import export
from aa_deploy.converters.onnxruntime import OnnxRuntimeRunner
from tests.helpers import cli

SHARED_TRAIN = __import__("tests.conftest", fromlist=["SHARED"]).SHARED / "data" / "cifar10-train2k"


def _quantize(folder, src, out, limit: int) -> None:
    if SHARED_TRAIN.is_dir():
        images = SHARED_TRAIN  # real calibration images: training images, never the test set
    else:  # pragma: no cover - a checkout without ../shared: crops of the bundled photos, never the test images
        images = folder / "images"
        images.mkdir(exist_ok=True)
        for i, crop in enumerate(bundled.photo_crops(limit, 32)):
            Image.fromarray(crop).save(images / f"{i}.png")
    proc = cli("quantize", src, "--calib-images", images, "--limit", str(limit), "-o", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def int8(tmp_path_factory):
    folder = tmp_path_factory.mktemp("int8")
    plain = export(bundled.resnet20(), folder / "r20.onnx", (2, 3, 32, 32))
    aa_deploy.convert(plain, folder / "r20.aa.onnx")  # reflect padding: the pooled blur form
    _quantize(folder, folder / "r20.aa.onnx", folder / "r20.int8.onnx", 256)
    return folder


def test_int8_agrees_with_fp32_on_real_images(int8):
    x = bundled.cifar_normalize(bundled.cifar_test_images()[0])
    fp32 = OnnxRuntimeRunner(int8 / "r20.aa.onnx")(x)
    q = OnnxRuntimeRunner(int8 / "r20.int8.onnx")(x)
    assert (fp32.argmax(1) == q.argmax(1)).mean() >= 0.95


def test_pooled_blurs_stay_float_average_pools(int8):
    before = onnx.load(int8 / "r20.aa.onnx")
    after = {n.name: n for n in onnx.load(int8 / "r20.int8.onnx").graph.node}
    pools = [n for n in before.graph.node if n.name.startswith("aa_blur") and n.op_type == "AveragePool"]
    assert len(pools) == 4  # two triangle blurs, two pools each
    assert all(after[n.name].op_type == "AveragePool" and after[n.name].domain == "" for n in pools)


def test_blur_taps_stay_float_and_exact(int8):
    # The Conv form (zero padding): its taps must be read as float, never through a DequantizeLinear.
    aa_deploy.convert(int8 / "r20.onnx", int8 / "r20.zero.onnx", aa_deploy.Options(pad="zero"))
    _quantize(int8, int8 / "r20.zero.onnx", int8 / "r20.zero.int8.onnx", 64)
    before = onnx.load(int8 / "r20.zero.onnx")
    after = onnx.load(int8 / "r20.zero.int8.onnx")
    taps = {n.input[1] for n in before.graph.node if n.name.endswith("/conv") and n.name.startswith("aa_blur")}
    assert len(taps) == 2
    inits_before = {t.name: onnx.numpy_helper.to_array(t) for t in before.graph.initializer}
    inits_after = {t.name: onnx.numpy_helper.to_array(t) for t in after.graph.initializer}
    producers = {o: n.op_type for n in after.graph.node for o in n.output}
    for name in taps:
        assert inits_after[name].dtype == np.float32 and np.array_equal(inits_after[name], inits_before[name])
        assert inits_after[name].reshape(inits_after[name].shape[0], -1).sum(axis=1) == pytest.approx(1.0)
        assert name not in producers  # read directly, not through a DequantizeLinear
    blur_convs = [n for n in after.graph.node if n.name.startswith("aa_blur") and n.op_type == "Conv"]
    assert all(producers.get(n.input[1]) is None for n in blur_convs)
    assert sum(n.op_type == "QuantizeLinear" for n in after.graph.node) > 10


def test_verify_int8_against_the_fp32_twin(int8, tmp_path):
    report = tmp_path / "p.json"
    proc = cli(
        "verify",
        int8 / "r20.int8.onnx",
        "--reference",
        "aa:cifar10_resnet20",
        "--antialiased",
        "--filter",
        "triangle",
        "--precision",
        "int8",
        "--images",
        "bundled:cifar10",
        "--report",
        report,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(report.read_text())["outputs"][0]
    assert out["top1_agreement"] >= 0.95 and out["max_abs"] > 1e-4  # really quantized, still agreeing


def test_quantize_without_onnxruntime_shape_inference(monkeypatch, tmp_path):
    # When onnxruntime's pre-processing fails outright, quantize goes on without it and says so.
    import onnxruntime.quantization.shape_inference as shape_inference

    from aa_deploy.converters.int8 import quantize
    from tests import graphs as G

    def fails(*args, **kwargs):
        raise Exception("Incomplete symbolic shape inference")

    monkeypatch.setattr(shape_inference, "quant_pre_process", fails)
    src, out = tmp_path / "m.onnx", tmp_path / "m.int8.onnx"
    src.write_bytes(G.conv_model([1, 3, 16, 16]).SerializeToString())
    report: dict = {}
    x = np.random.default_rng(0).standard_normal((5, 3, 16, 16)).astype(np.float32)  # fixed batch 1: 5 batches
    quantize(src, out, x, report=report)
    assert report["pre_process"].startswith("none")
    ops = {n.op_type for n in onnx.load(out).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    y = OnnxRuntimeRunner(out)(x[:1])
    assert y.shape == (1, 4, 8, 8)
