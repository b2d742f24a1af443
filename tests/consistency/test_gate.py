"""The consistency gate against the PyTorch original: passes where it must (the export of the trained
ResNet-20 against the network it was exported from), fails where it must (a perturbed classifier),
on the 100 real CIFAR-10 test images; one JUnit case per requirement per model."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from aa_deploy.common import bundled
from aa_deploy.consistency import gate
from aa_deploy.converters.export import export
from aa_deploy.verification.testing import assert_consistent
from tests.helpers import cli

REF = "aa:cifar10_resnet20"
REQUIRE = ("top1>=-0.5", "consistency>=0", "consistency.lower>=-3")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gate")
    plain = export(bundled.resnet20(), folder / "r20.onnx", (2, 3, 32, 32))
    # The classifier's rows for cat (3) and dog (5) swapped: those images are now called the other.
    proto = onnx.load(str(plain))
    gemm = next(n for n in proto.graph.node if n.op_type == "Gemm")
    weight = next(t for t in proto.graph.initializer if t.name == gemm.input[1])
    w = numpy_helper.to_array(weight).copy()
    w[[3, 5]] = w[[5, 3]]
    weight.CopyFrom(numpy_helper.from_array(w, weight.name))
    onnx.save(proto, str(folder / "r20.swapped.onnx"))
    return folder


def _gate(folder, *models, name="g"):
    report, junit = folder / f"{name}.json", folder / f"{name}.xml"
    args = [a for r in REQUIRE for a in ("--require", r)]
    proc = cli(
        "consistency", "--reference", REF, "--compare", *models, "--images", "bundled:cifar10",
        *args, "--report", report, "--junit", junit, "--no-latency",
    )  # fmt: skip
    return proc, json.loads(report.read_text()), ET.parse(junit).getroot()


def test_an_export_against_its_pytorch_original_passes_with_identical_outcomes(models):
    proc, report, junit = _gate(models, models / "r20.onnx")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ref, onnx_model = report["models"][f"reference:{REF}"], report["models"][str(models / "r20.onnx")]
    # identical views: the same outcome on every image, within the export's parity
    assert ref["per_image"] == onnx_model["per_image"]
    assert ref["per_image_correct"] == onnx_model["per_image_correct"]
    assert report["passed"] and len(report["requirements"]) == len(REQUIRE)
    assert junit.get("tests") == str(len(REQUIRE)) and junit.get("failures") == "0"
    assert report["cost"][str(models / "r20.onnx")]["multiply_adds_ratio"] == pytest.approx(1.0, rel=0.01)


def test_a_perturbed_classifier_fails_the_gate(models):
    proc, report, junit = _gate(models, models / "r20.onnx", models / "r20.swapped.onnx", name="bad")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    failed = [r for r in report["requirements"] if not r["passed"]]
    assert {r["model"] for r in failed} == {str(models / "r20.swapped.onnx")}
    assert "top1>=-0.5" in {r["requirement"] for r in failed}
    cases = junit.findall("testcase")
    assert len(cases) == 2 * len(REQUIRE) and junit.get("failures") == str(len(failed))
    assert sum(c.find("failure") is not None for c in cases) == len(failed)
    with pytest.raises(AssertionError, match="top1>=-0.5"):
        assert_consistent(
            [models / "r20.swapped.onnx"], require=REQUIRE, reference=REF, images="bundled:cifar10", passes=2
        )


def test_requirements_that_cannot_be_read_or_measured_are_one_line(models):
    proc = cli("consistency", models / "r20.onnx", "--images", "bundled:cifar10", "--require", "top1>=0")
    assert proc.returncode == 2 and "give one" in proc.stderr, proc.stderr  # nothing to compare
    for require, words in (("consistency=>0", "write METRIC"), ("top1>=-0.5", "needs labels")):
        images = "bundled:cifar10" if require != "top1>=-0.5" else str(bundled.PHOTOS)
        proc = cli("consistency", models / "r20.onnx", "--images", images, "--compare", models / "r20.swapped.onnx",
                   "--require", require, "--crop", "32", "--no-latency")  # fmt: skip
        assert proc.returncode == 2 and words in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


def test_bounds_read_the_paired_interval():
    from aa_deploy.consistency.protocols import ConsistencyResult

    base = ConsistencyResult("random-crop", 0.9, (0, 1), None, 4, 8, per_image=[1.0, 1.0, 0.6, 1.0])
    other = ConsistencyResult("random-crop", 0.95, (0, 1), None, 4, 8, per_image=[1.0, 1.0, 0.8, 1.0])
    point = gate.evaluate(gate.parse("consistency>=5"), "m", base, other)
    assert point.passed and point.observed == pytest.approx(5.0)
    lower = gate.evaluate(gate.parse("random-crop.lower>0"), "m", base, other)
    assert not lower.passed and lower.observed == pytest.approx(0.0)  # 3 of 4 images differ by 0
    upper = gate.evaluate(gate.parse("consistency.upper<=20"), "m", base, other)
    assert upper.passed and np.isclose(upper.observed, 15.0)  # at most 3 of 4 resampled images the changed one


def test_probe_of_the_pytorch_original_matches_its_export(models):
    """The probe reads the original's modules through hooks (a strided conv's output after its
    BatchNorm, which the export folds into the conv): per site the same figures as the export's graph."""
    from aa_deploy.common.input_format import InputFormat
    from aa_deploy.consistency.probe import probe, probe_module

    x = bundled.cifar_feed(InputFormat())(bundled.cifar_test_images()[0][:16])
    ours, theirs = probe_module(bundled.resnet20(), x), probe(models / "r20.onnx", x)
    assert [(p.kind, p.strides) for p in ours] == [(p.kind, p.strides) for p in theirs] and len(ours) == 4
    for a, b in zip(ours, theirs):
        assert a.cumulative_stride == b.cumulative_stride
        for field in ("aliasing", "equivariance_error", "subpixel_error"):
            assert getattr(a, field) == pytest.approx(getattr(b, field), rel=1e-3, abs=1e-6), (a, b)
