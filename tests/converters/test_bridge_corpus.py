"""Coverage of the calibration bridge on real architectures, exported both ways users export them
(torch's dynamo exporter and its TorchScript exporter, dynamic batch): after `convert`, the bridge's
output equals ONNX Runtime's within 1e-4 of the output scale, and `stats` calibration runs on it.
Random weights (the bridge's exactness does not depend on them). Slow: marked zoo."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import aa_deploy
from aa_deploy.calibration.stats import calibrate_stats
from aa_deploy.common import model_io
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


LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
ZOO_CLASSICS = sorted(p.name for p in LIGHT.glob("light_*.onnx"))


@pytest.mark.parametrize("name", ZOO_CLASSICS)
def test_bridge_equals_onnxruntime_on_the_zoo_classics_of_the_onnx_wheel(tmp_path, name):
    """The ONNX Model Zoo graphs the onnx wheel carries (old opsets, IR 3, synthetic weights): after `convert`,
    the bridge's output passes calibrate's own check against ONNX Runtime (a final Softmax's logits where
    float32 cannot decide the probabilities), original and converted, and `stats` runs on them."""
    from aa_deploy.calibration.matching import counterparts
    from aa_deploy.common import bundled
    from aa_deploy.converters.bridge_check import check_against_onnxruntime

    assert len(ZOO_CLASSICS) == 9
    src, converted = LIGHT / name, tmp_path / "m.aa.onnx"
    aa_deploy.convert(src, converted)
    size = model_io.input_spec(src)[1][-1]
    x = (bundled.photo_crops(2, size).astype(np.float32) / 255.0 - 0.45).transpose(0, 3, 1, 2) / 0.25
    modules = {}
    for path in (src, converted):
        _, modules[path] = load_module(path)
        assert check_against_onnxruntime(path, modules[path], np.ascontiguousarray(x)) <= 1e-4
    student, teacher = modules[converted], modules[src]
    match = counterparts(student, teacher)  # by name, or by structure where the rewrite renamed
    assert match.matched == match.convs
    report = calibrate_stats(student, teacher, torch.from_numpy(np.ascontiguousarray(x[:1])), names=match.names)
    assert len(report) == match.convs
