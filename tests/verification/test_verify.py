"""The parity gate: passes on a correct deployment, fails (exit 1, naming the output) on a wrong one."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import aa_deploy
from aa_deploy.common import bundled
from aa_deploy.converters.export import export
from aa_deploy.verification.comparator import Check
from aa_deploy.verification.parity import Inputs
from aa_deploy.verification.testing import assert_parity
from tests.helpers import cli

REF = "aa:cifar10_resnet20"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("verify")
    plain = export(bundled.resnet20(), folder / "r20.onnx", (2, 3, 32, 32))
    aa_deploy.convert(plain, folder / "r20.aa.onnx", aa_deploy.Options(filter="rect"))
    return folder


def test_converted_model_passes_against_its_twin_on_real_images(models):
    report, junit = models / "parity.json", models / "parity.xml"
    proc = cli(
        "verify",
        models / "r20.aa.onnx",
        "--reference",
        REF,
        "--images",
        "bundled:cifar10",
        "--report",
        report,
        "--junit",
        junit,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(report.read_text())
    assert data["schema"] == "aa-deploy.parity/1" and data["kind"] == "parity" and data["passed"] is True
    assert data["reference_antialiased"]["filter"] == "rect"  # read from the model's metadata
    (out,) = data["outputs"]
    assert out["top1_agreement"] == 1.0 and out["max_rel"] < 1e-5 and data["inputs"]["count"] == 100
    suite = ET.parse(junit).getroot()
    assert suite.get("tests") == "1" and suite.get("failures") == "0"


def test_plain_export_passes_against_plain_model(models):
    result = aa_deploy.verify(models / "r20.onnx", bundled.resnet20(), Inputs(count=16))
    assert result.passed and result.reference_antialiased is None


def test_change_report_never_fails_and_is_labelled(models):
    proc = cli("verify", models / "r20.aa.onnx", "--reference", REF, "--change", "--images", "bundled:cifar10")
    assert proc.returncode == 0 and "CHANGE (not a failure)" in proc.stdout
    result = aa_deploy.verify(models / "r20.aa.onnx", REF, Inputs("bundled:cifar10"), Check("change"))
    assert result.kind == "change" and result.passed and result.outputs[0].top1_agreement < 1.0


def test_gate_fails_on_one_perturbed_weight(models, tmp_path):
    m = onnx.load(models / "r20.aa.onnx")
    weight = next(t for t in m.graph.initializer if t.name.startswith("layer3.2.conv2"))
    array = onnx.numpy_helper.to_array(weight).copy()
    array.flat[0] += 0.5
    weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
    onnx.save(m, tmp_path / "bad.onnx")
    report = tmp_path / "r.json"
    proc = cli("verify", tmp_path / "bad.onnx", "--reference", REF, "--images", "bundled:cifar10", "--report", report)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = json.loads(report.read_text())["outputs"][0]
    assert out["name"] == "output" and not out["passed"] and "max abs error" in out["failure"]


def test_gate_fails_on_the_wrong_filter(models, tmp_path):
    report = tmp_path / "r.json"
    proc = cli(
        "verify",
        models / "r20.aa.onnx",
        "--reference",
        REF,
        "--antialiased",
        "--filter",
        "triangle",
        "--report",
        report,
    )
    assert proc.returncode == 1
    data = json.loads(report.read_text())
    assert data["reference_antialiased"]["filter"] == "triangle" and not data["outputs"][0]["passed"]


class SwappedHW(nn.Module):
    """A deployment bug: the graph reads its input as N x C x W x H."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.transpose(2, 3))


def test_gate_fails_on_a_transposed_input_layout(tmp_path):
    swapped = export(SwappedHW(bundled.resnet20()), tmp_path / "swapped.onnx", (2, 3, 32, 32))
    result = aa_deploy.verify(swapped, bundled.resnet20(), Inputs("bundled:cifar10"))
    assert not result.passed and result.outputs[0].name == "output"
    with pytest.raises(AssertionError, match="output .* FAILED"):
        assert_parity(swapped, bundled.resnet20(), Inputs("bundled:cifar10"))


def test_assert_parity_passes_quietly(models):
    result = assert_parity(models / "r20.aa.onnx", bundled.resnet20(), Inputs(count=4))
    assert result.passed


def test_compare_metrics_by_hand():
    from aa_deploy.verification.comparator import Tolerance, compare

    ref = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], np.float32)
    got = ref + np.array([[0.0, 0.0, 0.5], [0.0, 2.0, 0.0]], np.float32)
    o = compare("y", ref, got, Tolerance(atol=0.1, rtol=0.0, min_top1=1.0))
    assert o.max_abs == pytest.approx(2.0) and o.max_rel == pytest.approx(2.0 / 3.0)
    assert o.top1_agreement == 0.5 and o.top5_agreement == 1.0 and not o.passed
    assert compare("y", ref, ref, Tolerance(0, 0, 1)).passed


def test_input_errors_exit_2(models, tmp_path):
    for args, needle in [
        (("verify", tmp_path / "none.onnx", "--reference", REF), "no such file"),
        (("verify", models / "r20.onnx", "--reference", REF, "--input-shape", "3x32"), "input-shape"),
        (("verify", models / "r20.onnx", "--reference", REF, "--images", tmp_path), "no images"),
        (("verify", models / "r20.onnx", "--reference", "nosuch:thing"), "cannot import"),
        (("verify", models / "r20.onnx", "--reference", REF, "--backend", "tensorrt"), "tensorrt"),
    ]:
        proc = cli(*args)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_reference_with_non_finite_values_fails_the_gate():
    """NaN compares false with every bound: a reference that returns NaN must fail, not pass."""
    from aa_deploy.verification.comparator import Tolerance, compare

    ref = np.array([[0.5, np.nan, 1.0], [1.0, 2.0, 3.0]], np.float32)
    got = np.array([[0.5, 0.0, 1.0], [1.0, 2.0, 3.0]], np.float32)
    tol = Tolerance(1e-4, 1e-4, 0.99, 0.9999)
    result = compare("logits", ref, got, tol)
    assert not result.passed and "reference has non-finite values" in result.failure
    assert compare("logits", got, got, tol).passed


def test_verify_of_a_calibrated_model_uses_its_calibrated_weights(tmp_path):
    """The file that ships is the calibrated one: verify builds the twin with the weights read from the
    model (its aa_deploy.calibration metadata says it was calibrated) and passes at fp32 tolerances."""
    from PIL import Image

    original = export(bundled.resnet20(), tmp_path / "r20.onnx", (2, 3, 32, 32))
    converted, calibrated = tmp_path / "r20.aa.onnx", tmp_path / "r20.aa.cal.onnx"
    aa_deploy.convert(original, converted)
    images = tmp_path / "crops"
    images.mkdir()
    for i, crop in enumerate(bundled.photo_crops(40, 32)):
        Image.fromarray(crop).save(images / f"{i}.png")
    proc = cli("calibrate", converted, "--teacher", original, "--images", images, "--method", "reconstruct",
               "-o", calibrated)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = tmp_path / "parity.json"
    proc = cli("verify", calibrated, "--reference", "aa:cifar10_resnet20", "--images", "bundled:cifar10",
               "--report", report)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(report.read_text())
    assert data["passed"] and data["inputs"]["calibrated_weights"] > 0
    assert data["outputs"][0]["top1_agreement"] == 1.0


def test_every_runner_has_polygraphy_s_lifecycle(tmp_path):
    """ONNX Runtime and PyTorch runners alike: made active, `infer` by output name equal to `run`, released
    by a `with` block (running then is refused in one line), and loaded again by `activate`."""
    from aa_deploy.converters.backends import make_runner
    from aa_deploy.converters.interface import Runner
    from aa_deploy.converters.pytorch import TorchRunner

    module = bundled.resnet20()
    export(module, tmp_path / "r20.onnx", (1, 3, 32, 32))
    x = bundled.cifar_normalize(bundled.cifar_test_images()[0][:4])
    expected = module(torch.from_numpy(x)).detach().numpy()
    for runner in (make_runner(tmp_path / "r20.onnx"), TorchRunner(module)):
        assert isinstance(runner, Runner) and runner.is_active
        with runner as active:
            assert active is runner
            named = runner.infer({runner.input_names[0]: x})
            assert list(named) == runner.output_names
            np.testing.assert_allclose(named[runner.output_names[0]], expected, rtol=1e-4, atol=1e-4)
            np.testing.assert_array_equal(runner(x), named[runner.output_names[0]])
        assert not runner.is_active
        with pytest.raises(RuntimeError, match="not active"):
            runner(x)
        np.testing.assert_array_equal(runner.activate()(x), named[runner.output_names[0]])
