"""Every command that reads images measures at the model's own input size when no --size is given: a 128-px
grayscale model (whose --mean/--std are needed, one value each) and a 96x160 colour model."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from aa_deploy.common import bundled
from aa_deploy.converters.export import export
from tests.helpers import cli


class Small(nn.Module):
    """Two strided convs, a global pool and a classifier: two downsampling sites."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
        )  # fmt: skip

    def forward(self, x):
        return self.body(x)


MODELS = {"gray128": (1, 128, 128), "rgb96x160": (3, 96, 160)}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request, tmp_path_factory):
    from PIL import Image

    channels, h, w = MODELS[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    path = export(Small(channels).eval(), tmp / "m.onnx", (1, channels, h, w))
    images = tmp / "images"
    images.mkdir()
    for i, crop in enumerate(bundled.photo_crops(40, max(h, w) + 32)):
        Image.fromarray(crop).save(images / f"{i:02d}.png")
    norm = ("--mean", "0.5", "--std", "0.25") if channels == 1 else ()
    return path, images, norm, (h, w), tmp


def _ok(proc):
    assert proc.returncode in (0, 1), proc.stderr
    assert "the model takes" not in proc.stderr


def test_consistency_and_probe_measure_at_the_models_size(model):
    path, images, norm, (h, w), tmp = model
    report = tmp / "c.json"
    _ok(cli("consistency", path, "--compare", path, "--images", images, "--no-latency", "--report", report, *norm))
    crop = json.loads(report.read_text())["models"][str(path)]["settings"]["crop"]
    assert (crop if isinstance(crop, list) else [crop, crop]) == [h, w]
    _ok(cli("probe", path, "--images", images, "--count", "4", *norm))


def test_calibrate_quantize_and_tune_run_at_the_models_size(model):
    path, images, norm, (h, w), tmp = model
    converted = tmp / "m.aa.onnx"
    assert cli("convert", path, "-o", converted, "--no-drift").returncode == 0
    cal = tmp / "m.cal.onnx"
    proc = cli("calibrate", converted, "--teacher", path, "--images", images, "--method", "stats", "-o", cal, *norm)
    assert proc.returncode == 0, proc.stderr
    assert cli("quantize", path, "--calib-images", images, "-o", tmp / "m.int8.onnx", *norm).returncode == 0
    report = tmp / "t.json"
    proc = cli(
        "tune", path, "--images", images, "-o", tmp / "m.tuned.onnx", "--max-macs", "1.0", "--report", report, *norm
    )
    _ok(proc)
    rows = json.loads(report.read_text())["candidates"]
    assert rows[0]["status"] == "measured" and rows[0]["consistency"] is not None
