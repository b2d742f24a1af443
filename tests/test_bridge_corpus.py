"""Coverage of the calibration bridge on real architectures, exported both ways users export them
(torch's dynamo exporter and its TorchScript exporter, dynamic batch): after `convert`, the bridge's
output equals ONNX Runtime's within 1e-4 of the output scale, and `stats` calibration runs on it.
Random weights (the bridge's exactness does not depend on them). Slow: marked zoo."""

from __future__ import annotations

import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch

import aa_deploy
from aa_deploy.calibration.stats import calibrate_stats
from aa_deploy.converters.bridge import load_module

pytestmark = pytest.mark.zoo

# (family, builder spec, input size): the families of the "Calibrate anywhere" issue, from both libraries
CORPUS = [
    ("ResNet", "torchvision:resnet18", 64),
    ("ResNet", "timm:resnet50d", 64),
    ("RegNet", "torchvision:regnet_x_400mf", 64),
    ("RegNet", "timm:regnety_002", 64),
    ("MobileNetV3", "torchvision:mobilenet_v3_small", 64),
    ("MobileNetV3", "timm:mobilenetv3_small_050", 64),
    ("EfficientNet", "torchvision:efficientnet_b0", 64),
    ("EfficientNet", "timm:efficientnet_b0", 64),
    ("ShuffleNet", "torchvision:shufflenet_v2_x0_5", 64),
    ("VGG", "torchvision:vgg11", 224),
    ("DenseNet", "torchvision:densenet121", 64),
    ("Inception", "torchvision:inception_v3", 128),
    ("Inception", "timm:inception_v3", 128),
    ("ConvNeXt", "torchvision:convnext_tiny", 64),
    ("ConvNeXt-V2", "timm:convnextv2_atto", 64),
    ("Swin", "torchvision:swin_t", 224),
    ("Swin", "timm:swin_tiny_patch4_window7_224", 224),
    ("ViT", "timm:vit_tiny_patch16_224", 224),
]
EXPORTERS = ["dynamo", "torchscript"]


def _build(spec: str) -> torch.nn.Module:
    source, _, name = spec.partition(":")
    torch.manual_seed(0)
    if source == "timm":
        import timm

        return timm.create_model(name, pretrained=False).eval()
    import torchvision

    kwargs = {"init_weights": False, "aux_logits": False} if name == "inception_v3" else {}
    return torchvision.models.get_model(name, weights=None, **kwargs).eval()


def _export(model, path, size, exporter):
    x = torch.rand(2, 3, size, size)
    kw: dict = {"input_names": ["input"], "output_names": ["output"], "dynamo": exporter == "dynamo"}
    if exporter == "dynamo":
        kw["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=1024)},)
    else:
        kw |= {"dynamic_axes": {"input": {0: "batch"}, "output": {0: "batch"}}, "opset_version": 17}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), **kw)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("family,spec,size", CORPUS, ids=[c[1] for c in CORPUS])
def test_bridge_equals_onnxruntime_and_stats_runs(tmp_path, family, spec, size, exporter):
    plain, converted = tmp_path / "m.onnx", tmp_path / "m.aa.onnx"
    _export(_build(spec), plain, size, exporter)
    aa_deploy.convert(plain, converted)
    x = np.random.default_rng(0).standard_normal((2, 3, size, size), dtype=np.float32)
    _, student = load_module(converted)
    with torch.no_grad():
        got = student(torch.from_numpy(x)).numpy()
    ref = ort.InferenceSession(str(converted)).run(None, {"input": x})[0]
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), f"{family} {spec} {exporter}"
    _, teacher = load_module(plain)
    report = calibrate_stats(student, teacher, torch.from_numpy(x))
    assert report, "no conv of the converted graph was matched to the original by output name"
    with torch.no_grad():
        assert torch.isfinite(student(torch.from_numpy(x))).all()
