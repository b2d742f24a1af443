"""INT8 by explicit Q/DQ on ONNX Runtime CPU: parity with fp32, blurs kept exact."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from PIL import Image

import aa_deploy
from aa_deploy import bundled
from converters.export import export
from converters.onnxruntime import OnnxRuntimeRunner
from tests.helpers import cli

SHARED_TRAIN = __import__("tests.conftest", fromlist=["SHARED"]).SHARED / "data" / "cifar10-train2k"


@pytest.fixture(scope="module")
def int8(tmp_path_factory):
    folder = tmp_path_factory.mktemp("int8")
    plain = export(bundled.resnet20(), folder / "r20.onnx", (2, 3, 32, 32))
    aa_deploy.convert(plain, folder / "r20.aa.onnx")
    if SHARED_TRAIN.is_dir():
        images = SHARED_TRAIN  # real calibration images: training images, never the test set
    else:  # pragma: no cover - a checkout without ../shared
        images = folder / "images"
        images.mkdir()
        for i, img in enumerate(bundled.cifar_test_images()[0][:64]):
            Image.fromarray(img).save(images / f"{i}.png")
    proc = cli(
        "quantize", folder / "r20.aa.onnx", "--calib-images", images, "--limit", "256", "-o", folder / "r20.int8.onnx"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return folder


def test_int8_agrees_with_fp32_on_real_images(int8):
    x = bundled.cifar_normalize(bundled.cifar_test_images()[0])
    fp32 = OnnxRuntimeRunner(int8 / "r20.aa.onnx")(x)
    q = OnnxRuntimeRunner(int8 / "r20.int8.onnx")(x)
    assert (fp32.argmax(1) == q.argmax(1)).mean() >= 0.95


def test_blur_taps_stay_float_and_exact(int8):
    before = onnx.load(int8 / "r20.aa.onnx")
    after = onnx.load(int8 / "r20.int8.onnx")
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
