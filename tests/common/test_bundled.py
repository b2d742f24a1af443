"""The bundled trained ResNet-20 on the bundled real CIFAR-10 test images, and the demo command."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import aa_deploy
from aa_deploy.common import bundled
from aa_deploy.converters.export import export
from aa_deploy.converters.onnxruntime import OnnxRuntimeRunner
from aa_deploy.twin.network import antialias_with, options_from_metadata
from tests.helpers import cli


@pytest.fixture(scope="module")
def resnet20_onnx(tmp_path_factory):
    return export(bundled.resnet20(), tmp_path_factory.mktemp("r20") / "resnet20.onnx", (2, 3, 32, 32))


def test_bundled_model_reaches_its_known_accuracy():
    images, labels = bundled.cifar_test_images()
    assert images.shape == (100, 32, 32, 3) and list(labels[:5]) == [3, 8, 8, 0, 6]
    with torch.no_grad():
        pred = bundled.resnet20()(torch.from_numpy(bundled.cifar_normalize(images))).argmax(1).numpy()
    assert (pred == labels).mean() == pytest.approx(0.94)  # the figure shared/README.md gives


@pytest.mark.parametrize("filt", ["rect", "triangle", "binomial"])
def test_converted_resnet20_matches_twin_on_real_images(resnet20_onnx, tmp_path, filt):
    out = tmp_path / "r20.aa.onnx"
    result = aa_deploy.convert(resnet20_onnx, out, aa_deploy.Options(filter=filt))
    assert [a.site.kind for a in result.actions] == ["strided-conv", "strided-slice"] * 2
    assert result.blurs == 2  # conv and option-A shortcut share one blur per block
    meta = aa_deploy.common.model_io.read_metadata(aa_deploy.common.model_io.load(out))
    twin, _ = antialias_with(bundled.resnet20(), options_from_metadata(meta))
    x = bundled.cifar_normalize(bundled.cifar_test_images()[0])
    with torch.no_grad():
        ref = twin(torch.from_numpy(x)).numpy()
    got = OnnxRuntimeRunner(out)(x)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    assert (got.argmax(1) == ref.argmax(1)).all()


def test_demo_runs_the_chain_and_prints_the_table(tmp_path):
    proc = cli("demo", "--workdir", tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Step 6: every site of ResNet-20 is blurred, and at each the calibrated model's tensor before the
    # subsampling carries less energy above the site's Nyquist frequency than the original's.
    sites = [line.split("│") for line in proc.stdout.splitlines() if "->" in line and "strided-" in line]
    assert [cells[3].strip() for cells in sites] == ["strided-conv", "strided-slice"] * 2, proc.stdout
    for cells in sites:
        original, calibrated = (float(v) for v in cells[5].split("->"))
        assert calibrated < original, cells
    for png in ("aliasing.png", "diagonal.png"):
        data = (tmp_path / png).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000, png
    assert "swing of p(correct class) over one period of the total stride (4 px)" in proc.stdout
    measured, tuned = proc.stdout.split("6/7 ")[0], proc.stdout.split("7/7 ")[1]
    rows = {line.split("│")[1].strip(): line for line in measured.splitlines() if line.count("│") >= 8}
    assert set(rows) == {"original", "converted (triangle)", "converted + calibrated"}, proc.stdout
    assert "94.0" in rows["original"]
    top1 = {name: float(line.split("│")[2]) for name, line in rows.items()}
    # Calibration on photo crops must win back most of what conversion alone costs.
    assert top1["converted (triangle)"] < top1["converted + calibrated"] <= top1["original"] + 2, top1
    assert top1["converted + calibrated"] - top1["converted (triangle)"] >= 10, top1
    # Step 7: tune on the photo crops, then every candidate it measured against the original on the 100 test
    # images, which neither its calibration nor its selection saw: dense sampling of the last level is more
    # consistent there, with the paired interval above zero, at the original's top-1.
    assert "candidates on 500 selection images" in tuned and "rule: the largest lower bound" in tuned, tuned
    final = tuned.split("neither calibrated nor chosen on")[1]
    rows = {cells[1].strip(): cells for cells in (line.split("│") for line in final.splitlines()) if len(cells) == 9}
    assert {"original", "dense-1", "blur + refit"} <= set(rows), final
    assert rows["dense-1"][2].strip() == rows["original"][2].strip()
    assert float(rows["dense-1"][4].split("(")[1].split(" to ")[0]) > 0, final
