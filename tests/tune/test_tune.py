"""`aa-deploy tune`: the rule on synthetic frontiers, the split, and the command end to end on the bundled
trained ResNet-20 and its CIFAR-10 test images (budget, time limit, metadata, gate, bad input)."""

from __future__ import annotations

import json
import time

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper

import aa_deploy
from aa_deploy.common import bundled, model_io
from aa_deploy.common.errors import InputError, SettingError
from aa_deploy.tune.rule import MEASURED, OUT_OF_TIME, OVER_BUDGET, Budget, Delta, Row, Rule
from aa_deploy.tune.selection import MIN_PART, split
from tests import graphs as G
from tests.cli.test_cli import assert_one_line_error
from tests.helpers import cli


def _row(name, macs, low, accuracy=0.0, status=MEASURED):
    d = Delta(low + 0.01, low, low + 0.02)
    return Row(name, macs, status=status, accuracy=0.9, accuracy_delta=Delta(accuracy, accuracy - 0.01, accuracy + 0.01),
               consistency=0.9, consistency_delta=d, one_pixel=0.9, one_pixel_delta=d)  # fmt: skip


ORIGINAL = _row("original", 1.0, 0.0)


def test_the_rule_takes_the_largest_lower_bound_within_budget_and_tolerance():
    rule = Rule(tolerance=0.5)
    rows = [
        ORIGINAL,
        _row("cheap", 1.0, 0.004),
        _row("best but too inaccurate", 1.0, 0.03, accuracy=-0.006),
        _row("best within tolerance", 2.0, 0.02, accuracy=-0.005),
        _row("better but over budget", 1.5, 0.05, status=OVER_BUDGET),
        _row("out of time", 1.0, 0.05, status=OUT_OF_TIME),
    ]
    assert rule.choose(rows).name == "best within tolerance"
    assert "tolerance" in rule.disqualifies(rows[2]) and rule.disqualifies(rows[4]) == OVER_BUDGET
    assert Rule(tolerance=0.7).choose(rows).name == "best but too inaccurate"


def test_ties_go_to_fewer_multiply_adds_then_the_earlier_candidate():
    rows = [ORIGINAL, _row("x2", 2.0, 0.01), _row("x1 first", 1.0, 0.01), _row("x1 second", 1.0, 0.01)]
    assert Rule().choose(rows).name == "x1 first"


def test_no_candidate_qualifies_without_a_gain_above_zero():
    """The original is never chosen, and a gain whose interval reaches zero is no reason to change it."""
    rows = [ORIGINAL, _row("unresolved", 1.0, 0.0), _row("worse", 1.0, -0.02), _row("lossy", 1.0, 0.02, -0.01)]
    assert Rule().choose(rows) is None
    assert Rule().choose([ORIGINAL]) is None


@pytest.mark.parametrize(
    "kw", [{"max_macs": 0.9}, {"max_latency": 0.5}, {"time_limit": 0}], ids=["macs", "latency", "time"]
)
def test_a_budget_below_the_original_is_refused(kw):
    with pytest.raises(SettingError):
        Budget(**kw)
    with pytest.raises(SettingError):
        Rule(tolerance=-1)


def _write(folder, images, labels=None):
    from PIL import Image

    for i, im in enumerate(images):
        sub = folder / (str(labels[i]) if labels is not None else "")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(sub / f"{i:03d}.png")
    return folder


def test_the_split_is_deterministic_disjoint_and_sized(tmp_path):
    folder = _write(tmp_path / "imgs", bundled.photo_crops(50, 32))
    a, b = split(folder, 0.5, seed=3), split(folder, 0.5, seed=3)
    assert a == b and not set(a.calibration) & set(a.selection)
    assert len(a.calibration) == len(a.selection) == 25 and split(folder, 0.5, seed=4) != a
    assert len(split(folder, 0.1, seed=0).selection) == MIN_PART  # each part keeps calibrate's minimum
    with pytest.raises(InputError, match="too few to tune"):
        split(folder, 0.5, seed=0, limit=2 * MIN_PART - 1)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """The bundled trained ResNet-20 exported, and the 100 bundled CIFAR-10 test images, a folder per class."""
    from aa_deploy.converters.export import export

    tmp = tmp_path_factory.mktemp("tune")
    images, labels = bundled.cifar_test_images()
    return export(bundled.resnet20(), tmp / "r20.onnx", (1, 3, 32, 32)), _write(tmp / "test100", images, labels)


def test_tune_end_to_end_chooses_by_the_rule_and_records_the_frontier(cifar, tmp_path):
    model, images = cifar
    out, report, plot, junit = (tmp_path / f for f in ("r20.tuned.onnx", "tune.json", "tune.png", "tune.xml"))
    began = time.perf_counter()
    proc = cli(
        "tune", model, "--images", images, "-o", out, "--max-macs", "2.5", "--time-limit", "1.5", "--report", report,
        "--plot", plot, "--junit", junit, "--require", "consistency.lower>=0",
    )  # fmt: skip
    wall = time.perf_counter() - began
    assert proc.returncode in (0, 1), proc.stderr
    assert "candidates on 50 selection images" in proc.stdout and "rule: the largest lower bound" in proc.stdout
    record = json.loads(report.read_text())
    rows = {r["name"]: r for r in record["candidates"]}
    # the sampled candidates cheapest first: the diagonal phases of the last level (x1.3), every phase of it
    # (x2.0), the diagonal phases of the last two (x2.3), every phase of them (x6.8)
    assert list(rows)[:5] == ["original", "dense-1/diagonal", "dense-1", "dense-2/diagonal", "dense-2"]
    assert rows["dense-2"]["status"] == OVER_BUDGET and rows["dense-1"]["status"] == MEASURED
    assert rows["dense-2/diagonal"]["status"] == MEASURED and rows["dense-2/diagonal"]["macs_ratio"] < 2.5
    assert record["accuracy"] == "top-1" and record["protocol"] == "pad-and-crop"  # labels from the folders
    assert record["pairs"] == 20 and "20 pairs per image" in record["rule"]  # a small input: its views cost little
    assert record["split"]["calibration"] == record["split"]["selection"] == 50
    assert wall < 90 * 1.05 + 30  # the limit bounds the search; loading the libraries comes before it
    assert "testsuite" in junit.read_text()
    chosen = record["chosen"]
    if chosen is None:
        assert proc.returncode == 1 and not out.exists() and "no candidate qualifies" in proc.stdout
        return
    assert proc.returncode == 0 and plot.stat().st_size > 0
    row = rows[chosen]
    assert row["consistency_delta"]["low"] > 0 and row["accuracy_delta"]["delta"] >= -0.005 - 1e-9
    meta = model_io.read_metadata(onnx.load(out))
    assert meta["tune"]["chosen"] == chosen and meta["tune"]["candidates"] == record["candidates"]
    if "calibrate" in chosen or "refit" in chosen:  # calibrated on the calibration part only
        assert meta["calibration"]["count"] == record["split"]["calibration"]


def test_a_short_time_limit_leaves_the_calibrations_out_and_holds(cifar, tmp_path):
    from aa_deploy.tune import Budget, Images, tune

    model, images = cifar
    began = time.perf_counter()
    tuned = tune(model_io.load(model), Images(images), Budget(max_macs=2.5, time_limit=15))
    assert time.perf_counter() - began < 15 * 1.5  # the limit holds (a margin for a machine shared with other jobs)
    statuses = {r.name: r.status for r in tuned.rows}
    assert statuses["dense-1"] == MEASURED
    assert {statuses[n] for n in ("blur + calibrate", "blur + dense-1 + calibrate")} == {OUT_OF_TIME}
    assert "blur + refit" not in statuses  # tried only where named
    again = tune(model_io.load(model), Images(images), Budget(max_macs=2.5, time_limit=15))
    timed = {"seconds": 0, "reason": ""}  # how long each took, and how much time was left, vary
    assert [r.as_dict() | timed for r in again.rows] == [r.as_dict() | timed for r in tuned.rows]


def test_bad_input_is_one_line(cifar, tmp_path):
    model, images = cifar
    out = tmp_path / "o.onnx"
    empty = tmp_path / "empty"
    empty.mkdir()
    few = _write(tmp_path / "few", bundled.photo_crops(2 * MIN_PART - 1, 32))
    assert_one_line_error(cli("tune", model, "--images", empty, "-o", out), 2, "no images found")
    assert_one_line_error(cli("tune", model, "--images", few, "-o", out), 2, "too few to tune")
    assert_one_line_error(cli("tune", model, "--images", images, "-o", out, "--max-macs", "0.8"), 2, "--max-macs")
    assert_one_line_error(cli("tune", model, "--images", images, "-o", model), 2, "would overwrite")
    assert_one_line_error(cli("tune", model, "--images", few, "-o", out, "--require", "top1>=0"), 2, "needs labels")
    assert_one_line_error(cli("tune", model, "--images", images, "-o", out, "--candidates", "dense-9"), 2, "blur+refit")
    relu = tmp_path / "relu.onnx"
    onnx.save(G.model([helper.make_node("Relu", ["X"], ["Y"])], [G.inp("X", [1, 3, 32, 32])], [G.out("Y", 4)]), relu)
    assert_one_line_error(cli("tune", relu, "--images", images, "-o", out), 2, "no candidate applies")
    assert not out.exists()


def test_a_latency_bound_times_each_candidate_against_the_original(cifar, monkeypatch):
    """--max-latency: every candidate built is timed on ONNX Runtime against the original, and the ratio
    recorded (a generous bound here, so that the machine's noise cannot decide the test). Every session
    tune opens (the original's for the selection and the timing, each candidate's) is released by its end."""
    from aa_deploy.converters.onnxruntime import OnnxRuntimeRunner
    from aa_deploy.tune import Budget, Images, tune

    opened: list[OnnxRuntimeRunner] = []
    activate = OnnxRuntimeRunner._activate
    monkeypatch.setattr(OnnxRuntimeRunner, "_activate", lambda self: (opened.append(self), activate(self))[1])
    model, images = cifar
    tuned = tune(model_io.load(model), Images(images), Budget(max_latency=50, time_limit=15))
    rows = {r.name: r for r in tuned.rows}
    assert rows["original"].latency_ratio == 1.0
    assert rows["dense-1"].status == MEASURED and 0 < rows["dense-1"].latency_ratio < 50
    timed = sum(r.latency_ratio is not None for r in tuned.rows[1:])  # built, then timed; some not measured
    measured = sum(r.status == MEASURED for r in tuned.rows[1:])
    assert len(opened) == 2 + timed + measured  # the original's two: the selection's and the timing's
    assert not any(runner.is_active for runner in opened)


def test_the_cheap_calibrations_keep_their_share_when_not_all_fit():
    """Time for two calibrations of at least MIN_CALIBRATION, not three: the first two keep a share each,
    the third (the costliest, last) gives up its own; with all three fitting, the time splits evenly."""
    from types import SimpleNamespace

    from aa_deploy.tune.search import MIN_CALIBRATION, _share

    def candidate(calibrates: bool, macs: float = 1.0):
        return SimpleNamespace(candidate=SimpleNamespace(training=object() if calibrates else None), macs_ratio=macs)

    later = [candidate(True), candidate(True), candidate(True, 2.0)]
    context = SimpleNamespace(per_scoring=10.0, clock=SimpleNamespace(left=40.0 + 2.5 * MIN_CALIBRATION))
    assert _share(later, context) == (2.5 * MIN_CALIBRATION + 40.0 - 20.0) / 2  # the third's measuring freed too
    assert _share(later[2:], context) > MIN_CALIBRATION  # the third, alone at its turn, gets what is left
    context.clock.left = 40.0 + 3 * MIN_CALIBRATION
    assert _share(later, context) == MIN_CALIBRATION
    context.clock.left = 5.0
    assert _share(later, context) < MIN_CALIBRATION  # not even one fits: out of time


def _logits(model, files, tmp_path) -> np.ndarray:
    """`model`'s logits on the CIFAR `files`, recomputed in ONNX Runtime."""
    from PIL import Image

    if isinstance(model, ir.Model):
        onnx.save(ir.serde.serialize_model(model), tmp_path / "candidate.onnx")
        model = tmp_path / "candidate.onnx"
    x = bundled.cifar_normalize(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]))
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {session.get_inputs()[0].name: x[i : i + 1]})[0] for i in range(len(x))])


def _hits(logits: np.ndarray, files) -> np.ndarray:
    """Top-1 hits against the class index each file's folder names."""
    return logits.argmax(1) == np.array([int(f.parent.name) for f in files])


def test_a_calibrated_candidate_is_measured_as_calibrated(cifar, tmp_path):
    """The figures of a calibrating candidate are those of its calibrated weights: its row's top-1 is the
    top-1 of the model tune returns for it, recomputed here in ONNX Runtime on the selection images (only
    there: it learned from the calibration part)."""
    from aa_deploy.tune import Budget, Images, tune

    model, images = cifar
    tuned = tune(model_io.load(model), Images(images), Budget(max_macs=1.1), only=("blur+refit",))
    row = next(r for r in tuned.rows if r.name == "blur + refit")
    assert row.status == MEASURED and row.calibration["method"] == "reconstruct"
    files = tuned.split.selection
    refit = _logits(tuned.measured["blur + refit"], files, tmp_path)
    assert row.accuracy_images == len(files) and abs(float(_hits(refit, files).mean()) - row.accuracy) < 1e-9
    # and they are not the uncalibrated blur's: the refit moved the answers
    uncalibrated = tmp_path / "blur.onnx"
    aa_deploy.convert(model, uncalibrated)
    assert np.abs(_logits(uncalibrated, files, tmp_path) - refit).max() > 1e-3


def test_an_uncalibrated_candidate_is_checked_on_every_image_it_never_learned_from(cifar, tmp_path):
    """A candidate that is not calibrated (dense sampling) has its top-1 counted on the calibration part too:
    its row's top-1 and its paired difference are over all 100 images, recomputed here in ONNX Runtime for it
    and for the original; the consistency figures stay on the selection part, the same images for every
    candidate."""
    from aa_deploy.tune import Budget, Images, tune

    model, images = cifar
    tuned = tune(model_io.load(model), Images(images), Budget(max_macs=2.5), only=("dense-1",))
    original, dense = tuned.rows[0], next(r for r in tuned.rows if r.name == "dense-1")
    files = tuned.split.selection + tuned.split.calibration
    ours = _hits(_logits(tuned.measured["dense-1"], files, tmp_path), files)
    theirs = _hits(_logits(model, files, tmp_path), files)
    assert dense.accuracy_images == original.accuracy_images == 100
    assert abs(float(ours.mean()) - dense.accuracy) < 1e-9 and abs(float(theirs.mean()) - original.accuracy) < 1e-9
    assert abs(float(ours.mean() - theirs.mean()) - dense.accuracy_delta.delta) < 1e-9
    assert len(tuned.split.selection) == 50  # what the consistency figures are over
