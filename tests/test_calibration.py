"""Calibration: the ONNX->PyTorch bridge is exact, and write-back changes initializer values only."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

import aa_deploy
from aa_deploy import bundled
from calibration.bridge import load_module
from calibration.calibrate import calibrate
from calibration.stats import calibrate_stats, conv_targets, moments
from converters.export import export
from tests.helpers import cli


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


@pytest.mark.parametrize("method,mode", [("stats", "pre"), ("distill", "pre"), ("stats", "blurpool")])
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
    meta = aa_deploy.model_io.read_metadata(after)
    assert meta["calibration"]["method"] == method and meta["options"]["mode"] == mode
    assert result.after["agreement"] >= result.before["agreement"] - 0.05
    for key, d in result.versus_teacher.items():  # paired with the teacher's run on the same shifts
        assert d["delta"] == pytest.approx(result.after[key] - result.teacher[key])
        assert d["ci95"][0] <= d["delta"] <= d["ci95"][1]
    assert meta["calibration"]["versus_teacher"] == json.loads(json.dumps(result.versus_teacher))


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
    (bad / "x.png").write_bytes(b"not an image")
    proc = cli("calibrate", *base, "--images", bad)
    assert proc.returncode == 2 and "unreadable image" in proc.stderr
    assert not (tmp_path / "o.onnx").exists()


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
    from calibration.distill import mixup

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
    got = moments(student, x, {t.output for t in targets})
    want = moments(teacher, x, {t.teacher_output for t in targets})
    for t in targets:
        (ms, ss), (mt, st) = got[t.output], want[t.teacher_output]
        torch.testing.assert_close(ss, st, rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(ms, mt, rtol=1e-3, atol=1e-4)


def test_a_rate_that_never_beats_the_start_backs_off(r20, tmp_path, monkeypatch):
    # Agreement that never improves: every rate fails, so training steps down through the smaller
    # candidates, each from the start, and ends at the smallest.
    import calibration.distill as distill

    monkeypatch.setattr(distill, "agreement", lambda *a, **k: 0.5)
    monkeypatch.setattr(distill, "range_test", lambda *a: (max(distill.LR_CANDIDATES), {}))
    result = calibrate(
        r20 / "r20.pre.onnx", r20 / "r20.onnx", r20 / "images", tmp_path / "c.onnx", max_epochs=2, patience=1
    )
    rates = [h["lr"] for h in result.history if h["epoch"] == 0]
    assert rates == sorted(distill.LR_CANDIDATES, reverse=True)
    assert result.lr == min(distill.LR_CANDIDATES) and result.best_epoch == 0


@pytest.mark.parametrize("patience,epochs", [(None, 4), (2, 2)])
def test_default_patience_counts_optimizer_steps_too(r20, tmp_path, monkeypatch, patience, epochs):
    # 70 training images = 2 steps an epoch. Default: max(2 epochs, 8 steps = 4 epochs) without
    # better agreement; a patience the caller gives is kept as given.
    import calibration.distill as distill

    monkeypatch.setattr(distill, "agreement", lambda *a, **k: 0.5)
    monkeypatch.setattr(distill, "range_test", lambda *a: (min(distill.LR_CANDIDATES), {}))
    monkeypatch.setattr(distill, "PATIENCE_EPOCHS", 2)
    monkeypatch.setattr(distill, "PATIENCE_STEPS", 8)
    result = calibrate(
        r20 / "r20.pre.onnx", r20 / "r20.onnx", r20 / "images", tmp_path / "c.onnx", max_epochs=20, patience=patience
    )
    assert [h["epoch"] for h in result.history] == list(range(epochs + 1))
    assert distill.default_patience(29) == 2 and distill.default_patience(3) == 3
