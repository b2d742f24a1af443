"""Calibration: the ONNX->PyTorch bridge is exact, and write-back changes initializer values only."""

from __future__ import annotations

import itertools
import json
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

import aa_deploy
from aa_deploy.calibration.frontier import Frontier
from aa_deploy.calibration.stats import calibrate_stats, conv_targets, moments
from aa_deploy.common import bundled
from aa_deploy.converters.bridge import load_module
from aa_deploy.converters.export import export
from tests.helpers import calibrate, cli, factor_spread


@pytest.fixture(scope="module")
def r20(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cal")
    plain = export(bundled.resnet20(), folder / "r20.onnx", (2, 3, 32, 32))
    for mode in ("pre", "blurpool"):
        aa_deploy.convert(
            plain,
            folder / f"r20.{mode}.onnx",
            aa_deploy.Options(mode=mode, pad="zero" if mode == "blurpool" else "reflect"),
        )
    images = folder / "images"
    # Mechanics only: the bundled test images stand in for unlabeled calibration images here.
    for i, img in enumerate(bundled.cifar_test_images()[0][:80]):
        (images / str(i % 3)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(images / str(i % 3) / f"{i}.png")
    return folder


@pytest.mark.parametrize("name", ["r20.onnx", "r20.pre.onnx", "r20.blurpool.onnx"])
def test_bridge_matches_onnxruntime(r20, name):
    _, module = load_module(r20 / name)
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32), dtype=np.float32)
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    ref = ort.InferenceSession(str(r20 / name)).run(None, {"input": x})[0]
    assert np.abs(got - ref).max() < 1e-4
    # pre (reflect): two pooled triangle blurs, each shared by a strided conv and its shortcut, no taps;
    # blurpool: one conv blur per strided conv plus one per shortcut, taps frozen
    pools = sum(n.op_type == "AveragePool" for n in module.nodes)
    assert (len(module.frozen), pools) == {"r20.onnx": (0, 0), "r20.pre.onnx": (0, 4), "r20.blurpool.onnx": (4, 0)}[
        name
    ]


def _structure(m: onnx.ModelProto):
    return [(n.name, n.op_type, list(n.input), list(n.output)) for n in m.graph.node], sorted(
        i.name for i in m.graph.initializer
    )


@pytest.mark.parametrize(
    "method,mode", [("stats", "pre"), ("reconstruct", "pre"), ("distill", "pre"), ("reconstruct", "blurpool")]
)
def test_write_back_changes_initializer_values_only(r20, tmp_path, method, mode):
    src = r20 / f"r20.{mode}.onnx"
    out = tmp_path / "cal.onnx"
    result = calibrate(src, r20 / "r20.onnx", r20 / "images", out, method=method, max_epochs=1, seed=0)
    before, after = onnx.load(src), onnx.load(out)
    assert _structure(before) == _structure(after)
    old = {t.name: onnx.numpy_helper.to_array(t) for t in before.graph.initializer}
    new = {t.name: onnx.numpy_helper.to_array(t) for t in after.graph.initializer}
    blur_taps = {
        n.input[1]
        for n in before.graph.node
        if any(p.key == "aa_deploy.blur" for p in n.metadata_props) and n.op_type == "Conv"
    }
    assert all(old[k].tobytes() == new[k].tobytes() for k in blur_taps)
    assert bool(blur_taps) == (mode == "blurpool")  # pre blurs are pooled (no taps); the structure check covers them
    assert sum(not np.array_equal(old[k], new[k]) for k in old) >= 19  # the convs moved
    # ORT on the written model == the calibrated PyTorch module that produced the weights.
    _, module = load_module(out)
    x = bundled.cifar_normalize(bundled.cifar_test_images()[0][:16])
    with torch.no_grad():
        ref = module(torch.from_numpy(x)).numpy()
    got = ort.InferenceSession(str(out)).run(None, {"input": x})[0]
    assert np.abs(got - ref).max() < 1e-4
    meta = aa_deploy.common.model_io.read_metadata(after)
    assert meta["calibration"]["method"] == method and meta["options"]["mode"] == mode
    assert meta["calibration"]["start"] == {"distill": "pointwise"}.get(method, method)  # distill's default start
    fed = meta["calibration"]["input"]
    assert fed == {"layout": "NCHW", "channels": 3, "height": 32, "width": 32, "dtype": "float32", "view": [32, 32]}
    assert meta["calibration"]["preprocess"]["size"] == 32
    assert result.after.agreement >= result.before.agreement - 0.05
    assert set(result.versus_teacher) == {"pad-and-crop", "circular"}
    for name, d in result.versus_teacher.items():  # paired with the teacher's run on the same shifts
        assert d.delta == pytest.approx(result.after.consistency[name] - result.teacher.consistency[name])
        assert d.ci95[0] <= d.delta <= d.ci95[1]
    keys = {"pad-and-crop": "consistency_pad_crop", "circular": "consistency_circular"}  # as models record them
    recorded = {keys[name]: d.as_dict() for name, d in result.versus_teacher.items()}
    assert meta["calibration"]["versus_teacher"] == json.loads(json.dumps(recorded))
    assert meta["calibration"]["after"] == json.loads(json.dumps(result.after.as_dict()))
    assert set(meta["calibration"]["after"]) == {
        "fidelity", "agreement", "consistency_pad_crop", "consistency_circular", "score"
    }  # fmt: skip


def test_calibrate_cli_errors(r20, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    base = (r20 / "r20.pre.onnx", "--teacher", r20 / "r20.onnx", "-o", tmp_path / "o.onnx")
    for extra, needle in [
        (("--images", empty), "no images found"),
        (("--images", r20 / "images", "--size", "64"), "takes 32 px"),
    ]:
        proc = cli("calibrate", *base, *extra)
        assert proc.returncode == 2 and needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, (
            proc.stderr
        )
    bad = tmp_path / "bad"
    bad.mkdir()
    for i, img in enumerate(bundled.cifar_test_images()[0][:24]):
        Image.fromarray(img).save(bad / f"{i:02d}.png")
    (bad / "x.png").write_bytes(b"not an image")
    proc = cli("calibrate", *base, "--images", bad)
    assert proc.returncode == 2 and "x.png: unreadable image" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "o.onnx").exists()
    with pytest.raises(ValueError, match="start must be one of"):
        calibrate(r20 / "r20.pre.onnx", r20 / "r20.onnx", r20 / "images", tmp_path / "o.onnx", start="nope")


def test_a_tensor_whose_shape_differs_from_the_teachers_is_one_line(r20, tmp_path):
    # The first strided conv runs at stride 1 and its output is subsampled after the Relu: same tensor
    # names as the teacher, one of them four times larger. A one-line error, no output file.
    m = onnx.load(r20 / "r20.onnx")
    conv = next(n for n in m.graph.node if n.op_type == "Conv" and 2 in onnx.helper.get_node_attr_value(n, "strides"))
    conv.attribute.remove(next(a for a in conv.attribute if a.name == "strides"))
    conv.attribute.append(onnx.helper.make_attribute("strides", [1, 1]))
    relu = next(n for n in m.graph.node if n.op_type == "Relu" and n.input[0] == conv.output[0])
    full, relu.output[0] = relu.output[0], relu.output[0] + "_full"
    pool = onnx.helper.make_node("MaxPool", [relu.output[0]], [full], kernel_shape=[1, 1], strides=[2, 2])
    nodes = list(m.graph.node)
    nodes.insert(nodes.index(relu) + 1, pool)
    del m.graph.node[:], m.graph.value_info[:]
    m.graph.node.extend(nodes)
    onnx.save(m, tmp_path / "moved.onnx")
    proc = cli("calibrate", tmp_path / "moved.onnx", "--teacher", r20 / "r20.onnx", "--images", r20 / "images",
               "-o", tmp_path / "o.onnx", "--method", "reconstruct")  # fmt: skip
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert conv.output[0] in proc.stderr and "positions" in proc.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_a_dense_teacher_is_named_as_such_in_the_report(r20, tmp_path):
    """calibrate with the dense conversion of the original as teacher runs through the CLI and says whom
    its figures and verdict compare with: the dense teacher, not the original."""
    aa_deploy.convert(r20 / "r20.onnx", tmp_path / "d2.onnx", aa_deploy.Options(filter="none", dense_last=2))
    proc = cli("calibrate", r20 / "r20.pre.onnx", "--teacher", tmp_path / "d2.onnx", "--images", r20 / "images",
               "-o", tmp_path / "o.onnx", "--method", "reconstruct")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "dense teacher" in proc.stdout and "against the dense teacher" in " ".join(proc.stdout.split())
    assert "│ original" not in proc.stdout
    assert (tmp_path / "o.onnx").exists()


def test_the_result_says_which_graph_is_dense_and_the_report_reads_it(r20, tmp_path):
    """A dense student (blur + dense-1) against the plain original: the result records it, and the report
    names the original as the teacher and never suggests dense sampling to a model that has it."""
    from rich.console import Console

    from aa_deploy.calibration.report import CalibrationReport

    student = tmp_path / "bd1.onnx"
    aa_deploy.convert(r20 / "r20.onnx", student, aa_deploy.Options(dense_last=1))
    result = calibrate(student, r20 / "r20.onnx", r20 / "images", tmp_path / "o.onnx", method="reconstruct")
    assert result.dense and not result.teacher_dense
    console = Console(record=True, width=200)
    console.print(CalibrationReport(result, tmp_path / "o.onnx"))
    text = console.export_text()
    assert "against the original" in text and "dense teacher" not in text and "--dense-last" not in text


def test_an_unreadable_image_met_in_a_worker_is_one_line(tmp_path):
    from aa_deploy.common.images import ImageFiles, Preprocess, batches

    Image.fromarray(bundled.cifar_test_images()[0][0]).save(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"not an image")
    files = ImageFiles([tmp_path / "a.png", tmp_path / "b.png"], Preprocess(size=32))
    with pytest.raises(aa_deploy.common.errors.InputError) as info:
        list(batches(files, np.arange(2), 1, workers=1))
    assert str(info.value).endswith(
        "b.png: unreadable image (cannot identify image file '" + str(tmp_path / "b.png") + "')"
    )
    assert "\n" not in str(info.value)


def test_bridge_runs_the_run_time_padding_guard(tmp_path):
    from tests import graphs as G

    src = tmp_path / "dyn.onnx"
    onnx.save(G.conv_model(["N", 3, "H", "W"]), src)
    aa_deploy.convert(src, tmp_path / "dyn.aa.onnx", aa_deploy.Options(filter="binomial"))
    _, module = load_module(tmp_path / "dyn.aa.onnx")
    session = ort.InferenceSession(str(tmp_path / "dyn.aa.onnx"))
    for size in (2, 9):
        x = np.random.default_rng(size).standard_normal((1, 3, size, size), dtype=np.float32)
        with torch.no_grad():
            got = module(torch.from_numpy(x)).numpy()
        assert np.abs(got - session.run(None, {"X": x})[0]).max() < 1e-5


def test_mixup_blends_pairs_of_the_batch():
    from aa_deploy.calibration.distill import mixup

    images = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
    mixed = mixup(images, np.random.default_rng(1))
    assert mixed.dtype == np.float32 and mixed.shape == images.shape
    # Every output pixel lies between the image's own value and its partner's: a convex blend.
    flat, out = images.reshape(16, -1).astype(np.float32), mixed.reshape(16, -1)
    found = 0
    for i in range(16):
        if np.allclose(out[i], flat[i], atol=1e-3):  # paired with itself
            found += 1
            continue
        for j in range(16):
            lam = (out[i] - flat[j]) / np.where(flat[i] != flat[j], flat[i] - flat[j], np.nan)
            lam = lam[np.isfinite(lam)]
            if lam.size and np.allclose(lam, lam[0], atol=1e-3) and 0 <= lam[0] <= 1:
                found += 1
                break
    assert found == 16


@pytest.mark.parametrize("pad", ["zero", "reflect"])
def test_stats_matches_every_conv_blurpool_ones_through_their_blur(r20, tmp_path, pad):
    # After `stats` each matched conv's per-channel output mean/std equal the teacher's on the same
    # images; a blurpool conv is read after its blur (Conv form: zero padding; pooled: reflect).
    src = tmp_path / "bp.onnx"
    aa_deploy.convert(r20 / "r20.onnx", src, aa_deploy.Options(mode="blurpool", pad=pad))
    (_, student), (_, teacher) = load_module(src), load_module(r20 / "r20.onnx")
    x = torch.from_numpy(bundled.cifar_normalize(bundled.cifar_test_images()[0][:64]))
    targets = conv_targets(student, teacher)
    through_blur = [t for t in targets if t.followed_by_blur]
    assert len(targets) == 19 and len(through_blur) == 2
    assert all(t.output != t.teacher_output and t.bias is not None for t in through_blur)
    calibrate_stats(student, teacher, x)
    got = moments(Frontier(student, x, 64), {t.output for t in targets})
    want = moments(Frontier(teacher, x, 64), {t.teacher_output for t in targets})
    for t in targets:
        (ms, ss), (mt, st) = got[t.output], want[t.teacher_output]
        torch.testing.assert_close(ss, st, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(ms, mt, rtol=1e-3, atol=1e-4)


def test_a_rate_whose_end_scores_below_the_start_backs_off(r20, tmp_path, monkeypatch):
    # A held-out score that falls with every measurement: each rate ends below its start, so
    # training steps down through the smaller candidates, each from the start, and then keeps the start.
    import aa_deploy.calibration.distill as distill
    import aa_deploy.calibration.held_out as held_out

    calls = itertools.count()
    monkeypatch.setattr(held_out, "per_image_score", lambda hits, runs: np.full(len(hits), -float(next(calls))))
    monkeypatch.setattr(distill, "range_test", lambda *a: (max(distill.LR_CANDIDATES), {}, 0.0))
    args = (r20 / "r20.pre.onnx", r20 / "r20.onnx", r20 / "images")
    result = calibrate(*args, tmp_path / "c.onnx", max_epochs=2, start="reconstruct")
    rates = [h.lr for h in result.history if h.epoch == 0]
    assert rates == sorted(distill.LR_CANDIDATES, reverse=True)
    assert result.lr == min(distill.LR_CANDIDATES) and result.kept_epoch == 0
    calibrate(*args, tmp_path / "start.onnx", method="reconstruct")
    kept, start = (
        {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(tmp_path / n).graph.initializer}
        for n in ("c.onnx", "start.onnx")
    )
    assert max(np.abs(kept[k] - start[k]).max() for k in start) < 1e-6


def test_the_whole_schedule_runs_and_its_end_is_kept(r20, tmp_path, monkeypatch):
    # Epoch 1 scores best, the end only above the start: all four epochs run (no early stop on a
    # lucky epoch) and the weights at the end are kept.
    import aa_deploy.calibration.distill as distill
    import aa_deploy.calibration.held_out as held_out

    scores = {2: 0.5, 3: 0.9}  # measurements 0, 1: teacher and converted; 2: the start; 3..6: epochs 1..4
    calls = itertools.count()
    monkeypatch.setattr(
        held_out, "per_image_score", lambda hits, runs: np.full(len(hits), scores.get(next(calls), 0.6))
    )
    monkeypatch.setattr(distill, "range_test", lambda *a: (1e-3, {}, 0.0))
    # The fidelity guard (tested on its own below) judges the end not worse than the start: this test is about
    # the schedule, whatever the guard would say on these 70 images.
    monkeypatch.setattr(distill, "worse", lambda end, start: False)
    result = calibrate(r20 / "r20.pre.onnx", r20 / "r20.onnx", r20 / "images", tmp_path / "c.onnx", max_epochs=4)
    assert [h.epoch for h in result.history] == [0, 1, 2, 3, 4]
    assert [h.planned for h in result.history[1:]] == [4, 4, 4, 4]
    assert result.kept_epoch == 4 and result.epochs == 4
    assert aa_deploy.common.model_io.read_metadata(onnx.load(tmp_path / "c.onnx"))["calibration"]["kept_epoch"] == 4


def test_worse_means_below_by_more_than_the_held_out_noise():
    from aa_deploy.calibration.held_out import PerImage, below, worse

    rng = np.random.default_rng(0)
    start = rng.integers(0, 2, 100) + rng.random(100)
    one = start.copy()
    one[np.flatnonzero(start >= 1)[:1]] -= 1  # one image loses its fidelity hit: within noise
    assert not below(one, start) and not below(start, start) and not below(start + 0.01, start)
    five = start.copy()
    five[np.flatnonzero(start >= 1)[:5]] -= 1  # five of 100 lose it, nothing gained elsewhere
    assert below(five, start) and not below(start, five)
    assert below(start - 0.01, start)  # every image a little lower
    noisy = start + rng.normal(0, 0.3, 100)  # as much lower on average, but no more than the noise says
    noisy -= noisy.mean() - start.mean() + 0.01
    assert not below(noisy, start)
    # Fidelity is guarded on its own: five images lose their hit while consistency pays for it in the score.
    hits = (start >= 1).astype(float)
    lost = hits.copy()
    lost[np.flatnonzero(hits)[:5]] = 0
    assert worse(PerImage(lost, start + 0.1), PerImage(hits, start))
    assert not worse(PerImage(hits, start + 0.1), PerImage(hits, start))


def test_a_time_limit_shortens_the_schedule():
    from aa_deploy.calibration.distill import schedule_length

    assert schedule_length(45, 3, None, 10.0) == 45  # no limit: the whole schedule
    assert schedule_length(45, 3, 100.0, 10.0) == 13  # 10 more epochs fit
    assert schedule_length(45, 3, 1e6, 10.0) == 45  # never longer than asked
    assert schedule_length(45, 3, 5.0, 10.0) == 3  # none fits: it ends here
    assert schedule_length(45, 3, -5.0, 10.0) == 3


def test_a_time_limit_spent_before_the_plan_keeps_the_start(r20, tmp_path):
    # The limit is gone by the time the plan is made: distillation is dropped from the plan before anything
    # trains, and the closed-form start (at its smallest) is the result.
    from aa_deploy.calibration.budget import START_LEAST
    from aa_deploy.calibration.calibrate import Planned
    from aa_deploy.calibration.distill import Epoch
    from aa_deploy.common.progress import Advance

    records = []
    result = calibrate(
        r20 / "r20.pre.onnx", r20 / "r20.onnx", r20 / "images", tmp_path / "c.onnx", max_epochs=5, time_limit=1e-3,
        progress=records.append,
    )  # fmt: skip
    plans = [r.plan for r in records if isinstance(r, Planned)]
    # (a second plan, made after the opening figures, when they ran slower than their estimate: the same sizes)
    assert plans and all(not p.sizes.distill and p.sizes.start_images == START_LEAST for p in plans)
    assert result.history == [] and result.epochs is None and result.trained_on == 0
    # the start's layers advance; nothing of distillation (epochs, teacher targets, decoding training images)
    assert {r.task for r in records if isinstance(r, Advance)} == {"refitting convs (closed-form start)"}
    assert not any(isinstance(r, Epoch) for r in records)
    assert (tmp_path / "c.onnx").exists()


def test_calibrate_runs_the_steps_at_the_sizes_its_time_plan_gives(r20, tmp_path, monkeypatch):
    # With the rates fixed, the plan is known in advance: the start reads the planned images, distillation
    # trains on the planned subset with the planned range test, and the result says so.
    import aa_deploy.calibration.calibrate as module
    from aa_deploy.calibration.budget import Rates

    # A training step of 0.2 s an image on 8-image batches: 45 s hold the range test at its floor and two
    # epochs of 20 to 55 of the 70 training images, whatever the seconds spent before the plan (3 to 15).
    # Forwards of 10 ms an image: slower than this machine's, so the opening figures run faster than their
    # estimate and the plan stands.
    rates = Rates(teacher=1e-2, student=1e-2, step=0.2, figures=0.5)
    monkeypatch.setattr(module, "measure_rates", lambda *a, **k: rates)
    monkeypatch.setattr(module, "fit_threads", _steady)  # and the machine's speed with them
    seen = {}
    real_closed_form, real_distill = module._closed_form, module.distill

    def closed_form(training):
        fit = real_closed_form(training)
        return lambda student, teacher, x, *a, **k: (
            seen.setdefault("start", len(x)) and fit(student, teacher, x, *a, **k)
        )

    def distill(student, teacher, train, checker, prepare, recipe, schedule, progress):
        seen.update(train=len(train), probe=schedule.probe, steps=schedule.range_steps, limit=schedule.time_limit)
        return real_distill(student, teacher, train, checker, prepare, recipe, schedule, progress)

    monkeypatch.setattr(module, "_closed_form", closed_form)
    monkeypatch.setattr(module, "distill", distill)
    records = []
    result = calibrate(
        r20 / "r20.pre.onnx", r20 / "r20.onnx", r20 / "images", tmp_path / "c.onnx", max_epochs=2, time_limit=45,
        batch_size=8, progress=records.append,
    )  # fmt: skip
    plan = [r.plan for r in records if isinstance(r, module.Planned)][-1]
    assert plan.sizes.distill and 0 < plan.sizes.train_images < 70  # 70 training images of 80; the plan cut them
    assert seen["start"] == plan.sizes.start_images
    assert (seen["train"], seen["probe"], seen["steps"]) == (
        plan.sizes.train_images, plan.sizes.probe_images, plan.sizes.range_steps,
    )  # fmt: skip
    assert seen["limit"] < 45 - plan.seconds["final figures"]  # distillation ends before the final figures' reserve
    assert result.trained_on == plan.sizes.train_images and result.plan is not None


def test_a_time_limit_sizes_the_held_out_slice_and_plans_before_the_opening_figures(r20, tmp_path, monkeypatch):
    """On a machine too slow for the held-out figures of every held-out image within a quarter of the limit,
    the slice is cut (to its floor here) before the teacher's answers are computed, the plan says so, and
    it is made before any figure is measured."""
    import aa_deploy.calibration.calibrate as module
    from aa_deploy.calibration.budget import HELD_FLOOR, Rates
    from aa_deploy.calibration.held_out import HeldOut

    rates = Rates(teacher=0.2, student=0.2, step=0.5, figures=0.0)  # a forward of 0.2 s an image
    monkeypatch.setattr(module, "measure_rates", lambda *a, **k: rates)
    records = []
    real_score = HeldOut.score

    def score(self, *a, **k):
        records.append("score")
        return real_score(self, *a, **k)

    monkeypatch.setattr(HeldOut, "score", score)
    result = calibrate(
        r20 / "r20.pre.onnx", r20 / "r20.onnx", r20 / "images", tmp_path / "c.onnx", held_out=0.5, time_limit=60,
        progress=records.append,
    )  # fmt: skip
    plans = [r for r in records if isinstance(r, module.Planned)]
    assert records.index(plans[0]) < records.index("score")  # the plan first
    first = plans[0].plan
    assert first.held_out == HELD_FLOOR == result.held_out < 40  # 40 asked for: half of the 80 images
    assert "held-out figures" in first.seconds and first.seconds["held-out figures"] > 0


def _steady(run):
    """A thread fit on a machine whose speed never changes: the threads as they are."""
    from aa_deploy.common.threads import ThreadFit

    return ThreadFit(torch.get_num_threads(), torch.get_num_threads(), 0.0, {torch.get_num_threads(): 1.0})


def test_a_time_limit_fits_the_cpu_threads_as_it_goes_and_no_limit_leaves_them(r20, tmp_path, monkeypatch):
    # On a machine where one thread runs the student three times faster than two (another job beside it):
    # under a time limit the threads are fitted before the plan and again at each step, the change is
    # reported, and the opening figures' seconds are counted at the faster threads. Without a limit nothing
    # is timed and the threads stay as they are (a reproducible run).
    import aa_deploy.calibration.calibrate as module
    from aa_deploy.common.threads import ThreadFit

    calls = []

    def beside_a_job(run):
        run()
        calls.append(run)
        return ThreadFit(1, 2, 1.9, {2: 0.3, 1: 0.1})

    monkeypatch.setattr(module, "fit_threads", beside_a_job)
    records = []
    calibrate(
        r20 / "r20.pre.onnx", r20 / "r20.onnx", r20 / "images", tmp_path / "c.onnx", method="stats", time_limit=60,
        progress=records.append,
    )  # fmt: skip
    fitted = [r for r in records if isinstance(r, module.ThreadsFitted)]
    assert len(calls) == len(fitted) >= 3 and fitted[0].fit.speed_up == pytest.approx(3.0)
    assert records.index(fitted[0]) < records.index(next(r for r in records if isinstance(r, module.Planned)))
    calls.clear()
    calibrate(r20 / "r20.pre.onnx", r20 / "r20.onnx", r20 / "images", tmp_path / "d.onnx", method="stats")
    assert calls == []


def test_the_threads_fitted_are_printed_in_one_line():
    from rich.console import Console

    from aa_deploy.calibration.calibrate import ThreadsFitted
    from aa_deploy.cli.events import show
    from aa_deploy.common.threads import ThreadFit

    console = Console(record=True, width=300)
    show(console, ThreadsFitted(ThreadFit(1, 2, 1.93, {2: 0.142, 1: 0.052})))
    assert console.export_text().strip() == (
        "1 CPU thread from here, not 2: other processes keep 1.9 cores busy (the student's forward on a few "
        "images: 2 threads 142 ms, 1 thread 52 ms)"
    )


def test_the_time_limit_flags_are_checked(r20, tmp_path):
    base = ("calibrate", r20 / "r20.pre.onnx", "--teacher", r20 / "r20.onnx", "--images", r20 / "images")
    for flags, message in (
        (("--time-limit", "0"), "--time-limit must be positive"),
        (("--epochs", "0"), "--epochs must be 1 or more"),
    ):
        proc = cli(*base, "-o", tmp_path / "d.onnx", *flags)
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "d.onnx").exists()
    # A limit gone before the plan: the plan says so before anything runs, and the start is written.
    proc = cli(*base, "-o", tmp_path / "e.onnx", "--time-limit", "0.001")
    assert proc.returncode == 0, proc.stderr
    assert "time limit 0.001 min:" in proc.stdout and "no distillation" in proc.stdout
    assert "held-out figures on 10 images" in proc.stdout
    assert "the time limit used 0 of its 70 training images" in proc.stdout.replace("\n", " ")


def test_soft_targets_average_the_teachers_probabilities_over_views(r20):
    from aa_deploy.calibration.teacher_targets import soft_targets
    from aa_deploy.calibration.views import pad_crop

    _, teacher = load_module(r20 / "r20.onnx")
    images = bundled.cifar_test_images()[0][:8]
    rng = np.random.default_rng(0)
    views = [pad_crop(images, 4, rng) for _ in range(3)]
    got = soft_targets(teacher, views, bundled.cifar_normalize, 2.0, batch=5).numpy()
    want = 0
    for v in views:  # NumPy softmax of ONNX Runtime's logits at temperature 2
        z = ort.InferenceSession(str(r20 / "r20.onnx")).run(None, {"input": bundled.cifar_normalize(v)})[0] / 2.0
        e = np.exp(z - z.max(1, keepdims=True))
        want = want + e / e.sum(1, keepdims=True)
    np.testing.assert_allclose(got, want / 3, atol=1e-5)


def test_held_out_score_does_not_reward_a_constant_model(r20):
    # fidelity + mean consistency: a model answering one class for everything is perfectly consistent
    # and scores below the teacher it was made from.
    from aa_deploy.calibration.held_out import HeldOut

    _, teacher = load_module(r20 / "r20.onnx")
    images = bundled.cifar_test_images()[0][:40]
    held = HeldOut(teacher, images, bundled.cifar_normalize, seed=0, batch=16)
    scored = held.score(teacher)
    figures, results, per_image = scored.figures, scored.runs, scored.per_image
    # fidelity: the teacher's own top-1 on each image (ONNX Runtime, an independent executor) against its
    # shift-averaged answer
    session = ort.InferenceSession(str(r20 / "r20.onnx"))
    x = bundled.cifar_normalize(images)
    top1 = np.concatenate([session.run(None, {"input": x[i : i + 2]})[0].argmax(1) for i in range(0, 40, 2)])
    assert figures.agreement == 1.0
    assert figures.fidelity == pytest.approx(float((top1 == held.averaged_top1).mean()))
    assert set(results) == set(figures.consistency) == {"pad-and-crop", "circular"}
    assert held.views() == 40 + sum(r.views for r in results.values())  # what a time plan scales scoring by
    cons = (figures.consistency["pad-and-crop"] + figures.consistency["circular"]) / 2
    assert per_image.score.shape == (40,) and per_image.score.mean() == pytest.approx(figures.fidelity + cons)
    assert figures.score == pytest.approx(per_image.score.mean())
    assert per_image.fidelity.mean() == pytest.approx(figures.fidelity)

    class Constant(torch.nn.Module):
        device = torch.device("cpu")

        def forward(self, x):
            return torch.nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long), 10).float()

    constant = held.score(Constant()).figures
    assert constant.consistency["pad-and-crop"] == constant.consistency["circular"] == 1.0
    assert constant.score < figures.score
    assert constant.fidelity == pytest.approx(float((held.averaged_top1 == 0).mean()))


def test_streamed_images_give_the_same_calibration_as_decoded_ones(r20, tmp_path, monkeypatch):
    # Beyond CACHE_BUDGET the training images are decoded batch by batch in DataLoader workers: same
    # batches, same order, so the same weights.
    import aa_deploy.calibration.calibrate as cal

    args = (r20 / "r20.pre.onnx", r20 / "r20.onnx", r20 / "images")
    kwargs = dict(method="distill", max_epochs=1, lr=1e-4, seed=0, workers=2)
    cached = calibrate(*args, tmp_path / "cached.onnx", **kwargs)
    monkeypatch.setattr(cal, "CACHE_BUDGET", 0)
    streamed = calibrate(*args, tmp_path / "streamed.onnx", **kwargs)
    a, b = onnx.load(tmp_path / "cached.onnx"), onnx.load(tmp_path / "streamed.onnx")
    for x, y in zip(a.graph.initializer, b.graph.initializer):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(x), onnx.numpy_helper.to_array(y))
    assert cached.after == streamed.after


def test_batch_sizes_follow_the_activation_size(r20):
    from aa_deploy.calibration.calibrate import EVAL_BUDGET, TRAIN_BUDGET, batch_sizes

    _, module = load_module(r20 / "r20.onnx")
    x = torch.from_numpy(bundled.cifar_normalize(bundled.cifar_test_images()[0][:2]))
    evaluation, train, per_sample = batch_sizes(module, x, None, 1)
    # ResNet-20 at 32 px: every node output of one sample, about 2 MB, so the caps decide
    assert 1 << 20 < per_sample < 4 << 20 and (evaluation, train) == (250, 64)
    assert batch_sizes(module, x, 7, 1)[1] == 7  # the user's batch is kept
    import aa_deploy.calibration.calibrate as cal

    big = per_sample * 40
    assert EVAL_BUDGET // big < 250 and TRAIN_BUDGET // big < 64  # a model 40x larger gets smaller batches
    module.activation_bytes = lambda sample: big
    evaluation, train, _ = cal.batch_sizes(module, x, None, 2)
    assert evaluation == EVAL_BUDGET // big and train == max(4, TRAIN_BUDGET // (big * 2))


def test_capture_stops_the_pass_at_the_last_named_tensor(r20):
    _, module = load_module(r20 / "r20.onnx")
    x = torch.from_numpy(bundled.cifar_normalize(bundled.cifar_test_images()[0][:4]))
    first_conv = next(n for n in module.nodes if n.op_type == "Conv").outputs[0].name
    seen = []
    module.hooks = {v.name: (lambda t, name=v.name: seen.append(name) or t) for n in module.nodes for v in n.outputs}
    out, captured = module(x, capture={first_conv})
    assert out is None and set(captured) == {first_conv} and seen[-1] == first_conv
    assert len(seen) < len(module.nodes) // 4


def test_device_choice(r20, tmp_path):
    from aa_deploy.calibration.calibrate import Compute

    assert Compute("cpu").torch_device().type == "cpu"
    assert Compute("auto").torch_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        proc = cli(
            "calibrate", r20 / "r20.pre.onnx", "--teacher", r20 / "r20.onnx", "--images", r20 / "images",
            "-o", tmp_path / "o.onnx", "--device", "cuda",
        )  # fmt: skip
        assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "o.onnx").exists()


def test_convert_says_when_the_model_needs_calibrating(r20, tmp_path):
    # The trained ResNet-20 converted with defaults answers differently on the bundled test images
    # (measured: 75 % top-1 agreement): one line saying so, naming calibrate. A toy graph that does
    # not take RGB images is not compared.
    from aa_deploy.verification.drift import output_drift

    proc = cli("convert", r20 / "r20.onnx", "-o", tmp_path / "c.onnx", "-q")
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("outputs moved"))
    assert "top-1 agreement with the original" in line and "aa-deploy calibrate" in line
    drift = output_drift(r20 / "r20.onnx", tmp_path / "c.onnx")
    # the figure against one computed here with ONNX Runtime on the same 100 images
    x = bundled.cifar_normalize(bundled.cifar_test_images()[0])
    a, b = (
        ort.InferenceSession(str(p)).run(None, {"input": x})[0].argmax(1)
        for p in (r20 / "r20.onnx", tmp_path / "c.onnx")
    )
    assert drift.count == 100 and drift.value == pytest.approx(float((a == b).mean()))
    assert drift.needs_calibration == (drift.value < 0.9)
    assert output_drift(r20 / "r20.onnx", r20 / "r20.onnx").value == 1.0
    from tests import graphs as G

    onnx.save(G.conv_model([1, 4, 16, 16]), tmp_path / "toy.onnx")
    assert output_drift(tmp_path / "toy.onnx", tmp_path / "toy.onnx") is None


def test_convert_then_calibrate_in_one_step(r20, tmp_path, capsys, monkeypatch):
    from aa_deploy.calibration.calibrate import Training
    from aa_deploy.cli import convert as convert_cli
    from aa_deploy.cli import main

    monkeypatch.setattr(convert_cli, "Training", lambda: Training(max_epochs=1, lr=1e-4))  # fast here
    out = tmp_path / "out" / "r20.cal.onnx"
    out.parent.mkdir()
    before = (r20 / "r20.onnx").read_bytes()
    code = main(["convert", str(r20 / "r20.onnx"), "-o", str(out), "-q", "--calibrate", str(r20 / "images")])
    text = capsys.readouterr().out
    assert code == 0 and "before calibration: top-1 agreement" in text and f"wrote {out}" in text
    meta = aa_deploy.common.model_io.read_metadata(onnx.load(out))
    assert meta["calibration"]["method"] == "distill" and meta["options"]["filter"] == "triangle"
    assert sorted(p.name for p in out.parent.iterdir()) == ["r20.cal.onnx"]  # no temporary file left
    assert (r20 / "r20.onnx").read_bytes() == before
    for args, needle in [
        (["--in-place"], "give -o FILE instead"),
        (["-o", str(tmp_path / "x.onnx"), "--calibrate", str(tmp_path / "nowhere")], "no such image folder"),
    ]:
        extra = ["--calibrate", str(r20 / "images")] if "--in-place" in args else []
        assert main(["convert", str(r20 / "r20.onnx"), *args, *extra]) == 2
        assert needle in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("mode", ["pre", "blurpool"])
def test_calibrated_weights_go_back_into_the_twin(r20, tmp_path, mode):
    # The calibrated graph's independent reference: the twin (separate conv and BatchNorm) with the
    # calibrated folded weights put back equals ONNX Runtime on the calibrated graph.
    from aa_deploy.twin.network import antialias_with, options_from_metadata
    from aa_deploy.twin.weights import load_folded_weights

    out = tmp_path / "cal.onnx"
    calibrate(r20 / f"r20.{mode}.onnx", r20 / "r20.onnx", r20 / "images", out, method="stats")
    model = aa_deploy.common.model_io.load(out)
    twin, _ = antialias_with(bundled.resnet20(), options_from_metadata(aa_deploy.common.model_io.read_metadata(model)))
    x = bundled.cifar_normalize(bundled.cifar_test_images()[0][:32])
    with torch.no_grad():
        before = twin(torch.from_numpy(x)).numpy()
    assert load_folded_weights(twin, model, torch.from_numpy(x[:2])) == 40  # 19 convs + the linear, weight and bias
    with torch.no_grad():
        got = twin(torch.from_numpy(x)).numpy()
    ref = ort.InferenceSession(str(out)).run(None, {"input": x})[0]
    assert np.abs(got - ref).max() < 1e-4 * np.abs(ref).max()
    assert np.abs(before - ref).max() > 1e-2 * np.abs(ref).max()  # calibration moved it: the check can fail


def test_student_views_alternate_pad_and_crop_with_circular_rolls():
    from aa_deploy.calibration.distill import _step_views
    from aa_deploy.calibration.recipe import Recipe

    images = np.random.default_rng(0).integers(1, 256, (6, 12, 12, 3)).astype(np.float32)
    student, teacher = _step_views(images, Recipe(student_views=3, circular=True), np.random.default_rng(1))
    assert len(student) == 3 and len(teacher) == Recipe.teacher_views
    offsets = [(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)]
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
    for k, view in enumerate(student):
        for img, canvas, got in zip(images, padded, view):
            rolled = any(np.array_equal(np.roll(img, s, axis=(0, 1)), got) for s in offsets)
            cropped = any(np.array_equal(canvas[4 + dy : 16 + dy, 4 + dx : 16 + dx], got) for dy, dx in offsets)
            # Only the unshifted view is both; images are >= 1, so a crop's zero border tells them apart.
            assert rolled if k % 2 else cropped
            assert not (rolled and cropped) or np.array_equal(img, got)


def test_invariance_loss_is_the_kl_to_the_views_mean_and_pulls_views_together():
    from aa_deploy.calibration.distill import invariance_loss

    torch.manual_seed(0)
    a = torch.randn(5, 10, requires_grad=True)
    b = torch.randn(5, 10)
    loss = invariance_loss((a, b), 2.0)
    pa, pb = torch.softmax(a.detach() / 2, 1).numpy(), torch.softmax(b / 2, 1).numpy()
    mean = (pa + pb) / 2
    want = sum((mean * (np.log(mean) - np.log(p))).sum(1).mean() for p in (pa, pb)) / 2 * 4
    np.testing.assert_allclose(float(loss.detach()), want, rtol=1e-5)
    assert float(invariance_loss((b, b.clone()), 2.0)) == pytest.approx(0.0, abs=1e-6)
    loss.backward()
    stepped = a.detach() - 1.0 * a.grad
    assert float(invariance_loss((stepped, b), 2.0)) < float(loss.detach())


def test_the_weight_average_is_what_is_scored_and_kept(r20, tmp_path, monkeypatch):
    # Every epoch scores better than the last, so the last epoch's weights are kept. With an average
    # over ~1e9 epochs those are the start's weights (the `reconstruct` result), though training moved
    # the weights themselves; without averaging they differ from the start.
    import aa_deploy.calibration.distill as distill
    import aa_deploy.calibration.held_out as held_out

    calls = iter(range(1000))
    monkeypatch.setattr(held_out, "per_image_score", lambda hits, runs: np.full(len(hits), float(next(calls))))
    monkeypatch.setattr(distill, "range_test", lambda *a: (1e-3, {}, 0.0))
    args = (r20 / "r20.pre.onnx", r20 / "r20.onnx", r20 / "images")
    calibrate(*args, tmp_path / "start.onnx", method="reconstruct")
    for name, average in (("avg.onnx", 1e9), ("plain.onnx", 0.0)):
        result = calibrate(
            *args, tmp_path / name, max_epochs=1, start="reconstruct", recipe=distill.Recipe(average_epochs=average)
        )
        assert result.kept_epoch == 1
    start, avg, plain = (
        {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(tmp_path / n).graph.initializer}
        for n in ("start.onnx", "avg.onnx", "plain.onnx")
    )
    assert max(np.abs(avg[k] - start[k]).max() for k in start) < 1e-5
    assert max(np.abs(plain[k] - start[k]).max() for k in start) > 1e-3


def test_recipe_options_reach_the_training_and_the_metadata(r20, tmp_path):
    base = ("calibrate", r20 / "r20.pre.onnx", "--teacher", r20 / "r20.onnx", "--images", r20 / "images")
    out = tmp_path / "o.onnx"
    proc = cli(*base, "-o", out, "--epochs", "1", "--shift", "6", "--invariance", "0.5", "--no-circular-views",
               "--average-epochs", "1")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    recipe = aa_deploy.common.model_io.read_metadata(onnx.load(out))["calibration"]["recipe"]
    assert (recipe["shift"], recipe["invariance"], recipe["circular"], recipe["average_epochs"]) == (6, 0.5, False, 1)
    for flag, value in (("--shift", "0"), ("--invariance", "-1"), ("--student-views", "0")):
        proc = cli(*base, "-o", tmp_path / "bad.onnx", flag, value)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and flag in proc.stderr, proc.stderr
    assert not (tmp_path / "bad.onnx").exists()


def test_rescale_after_blur_reaches_the_refit_and_the_metadata(r20, tmp_path):
    # `--rescale-after-blur`: the strided convs that read a blur keep the converted kernels up to one
    # factor per output channel; without it they are refit (kernels change shape, not only scale).
    from aa_deploy.common.inserted import reads_blurred

    base = ("calibrate", r20 / "r20.pre.onnx", "--teacher", r20 / "r20.onnx", "--images", r20 / "images",
            "--method", "reconstruct")  # fmt: skip
    for flag, out in (("--rescale-after-blur", tmp_path / "r.onnx"), (None, tmp_path / "f.onnx")):
        proc = cli(*base, "-o", out, *([flag] if flag else []))
        assert proc.returncode == 0, proc.stderr
        assert aa_deploy.common.model_io.read_metadata(onnx.load(out))["calibration"]["rescale_after_blur"] is bool(
            flag
        )

    def initializers(path):
        return {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}

    start, rescaled, refit = (initializers(p) for p in (r20 / "r20.pre.onnx", tmp_path / "r.onnx", tmp_path / "f.onnx"))
    converted = aa_deploy.common.model_io.load(r20 / "r20.pre.onnx")
    fed = [n.inputs[1].name for n in converted.graph if n.op_type == "Conv" and reads_blurred(n.inputs[0])]
    fed = [name for name in fed if name in start]
    assert len(fed) == 2
    assert all(factor_spread(rescaled[name], start[name]) < 1e-4 for name in fed)
    assert all(factor_spread(refit[name], start[name]) > 1e-2 for name in fed)


def test_limit_spreads_over_the_classes_of_a_folder_tree(tmp_path):
    """--limit N on a folder-per-class tree takes the classes in turn, not the first class's files;
    on a flat folder it takes evenly spaced files."""
    from aa_deploy.common.images import list_images, spread

    for c in ("cat", "dog", "emu"):
        (tmp_path / c).mkdir()
        for i in range(10):
            (tmp_path / c / f"{i:02d}.png").write_bytes(b"")
    files = list_images(tmp_path)
    picked = spread(files, 6, tmp_path)
    assert [p.parent.name for p in picked].count("cat") == 2 and {p.parent.name for p in picked} == {
        "cat",
        "dog",
        "emu",
    }
    assert [p.name for p in picked if p.parent.name == "dog"] == ["00.png", "01.png"]
    assert spread(files, None, tmp_path) == files and len(spread(files, 100, tmp_path)) == 30
    flat = [p for p in files if p.parent.name == "cat"]
    assert [p.name for p in spread(flat, 4, tmp_path / "cat")] == ["00.png", "03.png", "06.png", "09.png"]


def test_a_bridge_that_differs_from_onnxruntime_stops_calibration_naming_the_node(r20, tmp_path, monkeypatch):
    """Before any training, both graphs run through the bridge and through ONNX Runtime on one real
    batch: a wrong op (here Relu made the identity) is a one-line error naming the first node it feeds
    wrong, and nothing is written."""
    import aa_deploy.converters.bridge as bridge
    from aa_deploy.converters.bridge_check import check_against_onnxruntime

    _, module = load_module(r20 / "r20.onnx")
    x = bundled.cifar_normalize(bundled.cifar_test_images()[0][:4])
    assert check_against_onnxruntime(r20 / "r20.onnx", module, x) < 1e-5
    first_relu = next(n for n in module.nodes if n.op_type == "Relu")
    monkeypatch.setitem(bridge._ELEMENTWISE, "Relu", lambda t: t)
    with pytest.raises(aa_deploy.InputError, match=rf"first at node {first_relu.name} \(Relu\)") as e:
        calibrate(r20 / "r20.pre.onnx", r20 / "r20.onnx", r20 / "images", tmp_path / "o.onnx", method="stats")
    assert len(str(e.value).splitlines()) == 1 and "r20.pre.onnx" in str(e.value)
    assert not (tmp_path / "o.onnx").exists()


@pytest.fixture(scope="module")
def r20_torchscript(r20):
    """The same trained ResNet-20 through TorchScript's exporter: other tensor and weight names."""
    path = r20 / "r20.torchscript.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            bundled.resnet20().eval(), torch.zeros(1, 3, 32, 32), str(path), dynamo=False, opset_version=13,
            input_names=["image"], dynamic_axes={"image": {0: "n"}},
        )  # fmt: skip
    return path


def test_a_teacher_exported_the_other_way_is_matched_by_structure(r20, r20_torchscript, tmp_path):
    """A student converted from the dynamo export and a teacher from TorchScript's exporter share no
    tensor names; their layers match by structure, and the refit is the one the namesake teacher gives."""
    from aa_deploy.calibration.matching import counterparts

    student, by_name = load_module(r20 / "r20.pre.onnx")[1], load_module(r20 / "r20.onnx")[1]
    renamed = load_module(r20_torchscript)[1]
    assert not set(renamed.computed) & {n.outputs[0].name for n in student.nodes if n.op_type == "Conv"}
    named, structural = counterparts(student, by_name), counterparts(student, renamed)
    assert named.by == "names" and structural.by == "structure"
    assert structural.matched == structural.convs == named.convs == 19
    producer = {v.name: n.op_type for n in renamed.nodes for v in n.outputs}
    assert {producer[t] for t in structural.names.values()} == {"Conv", "Gemm", "Add"}
    results = {}
    for teacher in (r20 / "r20.onnx", r20_torchscript):
        out = tmp_path / f"{teacher.stem}.cal.onnx"
        result = calibrate(r20 / "r20.pre.onnx", teacher, r20 / "images", out, method="reconstruct")
        results[teacher.stem] = (
            {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(out)).graph.initializer},
            result,
        )
    (a, ra), (b, rb) = results.values()
    assert ra.start.matched_by == "names" and rb.start.matched_by == "structure"
    assert ra.start.refit == rb.start.refit == 20  # 19 convs and the classifier
    assert a.keys() == b.keys() and all(np.allclose(a[k], b[k], rtol=1e-3, atol=1e-5) for k in a)


def test_a_teacher_that_is_another_network_is_refused_with_the_count(r20, tmp_path):
    other = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, stride=2, padding=1),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10),
    )  # fmt: skip
    teacher = export(other, tmp_path / "other.onnx", (2, 3, 32, 32))
    out = tmp_path / "o.onnx"
    proc = cli("calibrate", r20 / "r20.pre.onnx", "--teacher", teacher, "--images", r20 / "images", "-o", out)
    assert proc.returncode == 2 and "of the 19 trainable convs" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists()


def test_default_calibrate_wins_back_agreement_on_images_it_did_not_see(r20, tmp_path):
    """Distillation for real (nothing replaced by fakes): the converted ResNet-20 calibrated with the
    default method on 400 crops of the bundled photos (2 epochs) agrees with the original on more of
    the 100 CIFAR-10 test images than the converted model does. The margin, 10 images, is beyond the
    noise of a paired difference on 100 images of this size (its standard error is about 4 points)."""
    from PIL import Image

    from aa_deploy.verification.drift import output_drift

    crops = tmp_path / "crops"
    crops.mkdir()
    for i, crop in enumerate(bundled.photo_crops(400, 32)):
        Image.fromarray(crop).save(crops / f"{i:04d}.png")
    out = tmp_path / "cal.onnx"
    result = calibrate(r20 / "r20.pre.onnx", r20 / "r20.onnx", crops, out, max_epochs=2)
    assert result.method == "distill" and result.epochs is not None
    before = output_drift(r20 / "r20.onnx", r20 / "r20.pre.onnx").value
    after = output_drift(r20 / "r20.onnx", out).value
    assert after >= before + 0.10, (before, after)


def test_the_in_memory_core_calibrates_graphs_and_writes_no_file(r20, tmp_path):
    # calibrate_model takes onnx_ir models (here made in memory, so ONNX Runtime checks them from a temporary
    # copy) and returns the calibrated graph: the same weights as the file shell writes for the same files.
    from onnx import numpy_helper

    from aa_deploy.calibration.calibrate import Data, Training, calibrate_model

    student, teacher = (aa_deploy.common.model_io.load(r20 / name) for name in ("r20.pre.onnx", "r20.onnx"))
    before = {v.name: v.const_value.numpy().copy() for v in student.graph.initializers.values()}
    made = calibrate_model(student, teacher, Data(r20 / "images"), Training(method="stats"))
    assert made.model is student and made.result.method == "stats" and not list(tmp_path.iterdir())
    assert "calibration" in aa_deploy.common.model_io.read_metadata(made.model)
    calibrate(r20 / "r20.pre.onnx", r20 / "r20.onnx", r20 / "images", tmp_path / "c.onnx", method="stats")
    written = {i.name: numpy_helper.to_array(i) for i in onnx.load(tmp_path / "c.onnx").graph.initializer}
    changed = [
        k for k, v in before.items() if not np.array_equal(v, made.model.graph.initializers[k].const_value.numpy())
    ]
    assert changed
    for name in before:
        np.testing.assert_array_equal(made.model.graph.initializers[name].const_value.numpy(), written[name])
