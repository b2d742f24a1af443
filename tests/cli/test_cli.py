"""The `aa-deploy` CLI on good and bad input: one-line errors, exit codes, no partial output."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from aa_deploy.cli import main
from aa_deploy.common import bundled
from tests import graphs as G
from tests.helpers import cli


@pytest.fixture
def conv_onnx(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(G.conv_model(["N", 3, 16, 16]), path)
    return path


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int, needle: str) -> None:
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert needle in lines[0]


def test_convert_writes_a_runnable_model_and_prints_the_table(conv_onnx, tmp_path):
    out = tmp_path / "model.aa.onnx"
    proc = cli("convert", conv_onnx, "--filter", "binomial", "--blur-stem", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "stage/conv.0" in proc.stdout and "strided-conv" in proc.stdout and "changed 1 of 1" in proc.stdout
    y = ort.InferenceSession(str(out)).run(None, {"X": np.ones((2, 3, 16, 16), np.float32)})[0]
    assert y.shape == (2, 4, 8, 8)
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".aa-deploy-")]  # no temporary left over


def test_the_stem_on_the_input_image_is_left_alone_unless_asked(conv_onnx, tmp_path):
    # The only site is a strided conv reading the 3-channel input: skipped by default, blurred on request.
    proc = cli("convert", conv_onnx, "-o", tmp_path / "a.onnx", "--no-drift")
    assert proc.returncode == 0 and "stem on the input image" in proc.stdout and "nothing added" in proc.stdout
    proc = cli("convert", conv_onnx, "-o", tmp_path / "b.onnx", "--no-drift", "--blur-stem")
    assert proc.returncode == 0 and "changed 1 of 1" in proc.stdout, proc.stdout
    assert cli("convert", conv_onnx, "-o", tmp_path / "c.onnx", "--skip-stem", "--blur-stem").returncode == 2
    assert not (tmp_path / "c.onnx").exists()


def test_inspect_json_lists_the_plan(conv_onnx, capsys):
    assert main(["inspect", str(conv_onnx), "--json", "--mode", "blurpool", "--blur-stem"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(p["node"], p["action"], p["stride"]) for p in out["sites"]] == [("stage/conv.0", "blurpool", [2, 2])]
    # the blur adds work: a depthwise 3x3 per output position and channel on top of the original conv
    assert out["cost"]["converted_multiply_adds"] > out["cost"]["original_multiply_adds"] > 0


def test_missing_file(tmp_path):
    assert_one_line_error(cli("convert", tmp_path / "nope.onnx", "-o", tmp_path / "o.onnx"), 2, "no such file")
    assert not (tmp_path / "o.onnx").exists()


def test_not_onnx_and_truncated(tmp_path, conv_onnx):
    text = tmp_path / "notes.onnx"
    text.write_text("hello, this is not a model\n" * 20)
    assert_one_line_error(cli("inspect", text), 2, "not a")
    data = conv_onnx.read_bytes()
    for cut in (len(data) // 3, len(data) - 7, 0):
        bad = tmp_path / f"cut{cut}.onnx"
        bad.write_bytes(data[:cut])
        proc = cli("convert", bad, "-o", tmp_path / "o.onnx")
        assert_one_line_error(proc, 2, str(bad))
        assert not (tmp_path / "o.onnx").exists()


def test_model_without_sites(tmp_path):
    m = G.model([helper.make_node("Relu", ["X"], ["Y"])], [G.inp("X", [1, 3, 4, 4])], [G.out("Y", 4)])
    path = tmp_path / "relu.onnx"
    onnx.save(m, path)
    assert_one_line_error(cli("convert", path, "-o", tmp_path / "o.onnx"), 2, "no downsampling sites")
    assert not (tmp_path / "o.onnx").exists()
    proc = cli("inspect", path)
    assert proc.returncode == 1 and "no downsampling sites" in proc.stdout


def test_input_is_never_overwritten_without_in_place(conv_onnx):
    before = conv_onnx.read_bytes()
    assert_one_line_error(cli("convert", conv_onnx, "-o", conv_onnx), 2, "would overwrite an input")
    assert conv_onnx.read_bytes() == before
    assert cli("convert", conv_onnx, "--in-place", "-q").returncode == 0
    assert conv_onnx.read_bytes() != before
    assert cli("convert", conv_onnx, "--in-place", "-q").returncode == 0  # idempotent


def test_bad_options_and_missing_output(conv_onnx):
    assert_one_line_error(cli("convert", conv_onnx, "--filter-size", "9", "-o", "x.onnx"), 2, "filter size")
    assert_one_line_error(cli("convert", conv_onnx, "--include", "(", "-o", "x.onnx"), 2, "regular expression")
    assert_one_line_error(cli("convert", conv_onnx), 2, "-o FILE")


def _unwritable_folder(tmp_path) -> Path:
    """A folder no write reaches, as root too: /sys refuses new files to everyone (a chmod'ed folder
    does not stop root, and CI runs as root)."""
    probe = Path("/sys/aa-deploy-probe")
    try:
        probe.write_text("")
    except OSError:
        return Path("/sys")
    probe.unlink()
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.geteuid() == 0:
        pytest.skip("no folder here refuses root's writes")
    return ro


@pytest.mark.parametrize("command", ["convert", "quantize"])
def test_unwritable_output_folder_is_one_plain_line(conv_onnx, tmp_path, command):
    folder = _unwritable_folder(tmp_path)
    args = ("--calib-images", bundled.PHOTOS, "--size", "16") if command == "quantize" else ()
    proc = cli(command, conv_onnx, *args, "-o", folder / "o.onnx")
    assert_one_line_error(proc, 2, "not permitted" if folder == Path("/sys") else "ermission")
    assert "report" not in proc.stderr  # a user's situation, not a bug


@pytest.mark.parametrize(
    "command, flag",
    [("consistency", "--passes"), ("consistency", "--batch"), ("probe", "--count"), ("verify", "--count")],
)
def test_counts_below_one_are_one_line(conv_onnx, command, flag):
    extra = ("--reference", "aa:cifar10_resnet20") if command == "verify" else ()
    assert_one_line_error(cli(command, conv_onnx, *extra, flag, "0"), 2, f"{flag} must be at least 1")


def test_16_bit_images_are_scaled_by_their_range(tmp_path):
    """A 16-bit greyscale PNG (a ramp over the whole 0..65535 range) reads as the same ramp in 8 bits,
    not as white: Pillow's own convert('RGB') clips 99 % of its pixels to 255."""
    from PIL import Image

    from aa_deploy.common.images import Preprocess, load_rgb

    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    x = load_rgb(tmp_path / "g16.png", Preprocess(size=64, resize=64))
    expected = np.round(ramp / 257.0).astype(np.uint8)
    assert np.abs(x[..., 0].astype(int) - expected).max() <= 1 and (x == 255).mean() < 0.05


def test_missing_output_folder(conv_onnx, tmp_path):
    assert_one_line_error(cli("convert", conv_onnx, "-o", tmp_path / "no" / "o.onnx"), 2, "does not exist")


def test_external_data_in_external_data_out(tmp_path):
    m = G.conv_model([1, 3, 16, 16], c_out=64)
    src = tmp_path / "ext.onnx"
    onnx.save(
        m, src, save_as_external_data=True, all_tensors_to_one_file=True, location="ext.onnx.data", size_threshold=0
    )
    out = tmp_path / "out" / "ext.aa.onnx"
    out.parent.mkdir()
    assert cli("convert", src, "-o", out, "-q").returncode == 0
    assert (out.parent / "ext.aa.onnx.data").exists()
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16), dtype=np.float32)
    assert ort.InferenceSession(str(out)).run(None, {"X": x})[0].shape == (1, 64, 8, 8)
    (tmp_path / "ext.onnx.data").unlink()
    assert_one_line_error(cli("inspect", src), 2, "external data")


def test_no_command_writes_over_its_inputs(tmp_path):
    """calibrate -o TEACHER, convert -o MODEL --calibrate DIR and quantize -o MODEL each refuse in one
    line before any work, and leave the file as it was."""
    from aa_deploy.common import bundled
    from aa_deploy.converters.export import export

    original = export(bundled.resnet20(), tmp_path / "r20.onnx", (2, 3, 32, 32))
    converted = tmp_path / "r20.aa.onnx"
    assert cli("convert", original, "-o", converted, "--no-drift").returncode == 0
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    for i, crop in enumerate(bundled.photo_crops(24, 32)):
        Image.fromarray(crop).save(images / f"{i}.png")
    before = {p: p.read_bytes() for p in (original, converted)}
    calls = (
        ("calibrate", converted, "--teacher", original, "--images", images, "-o", original),
        ("calibrate", converted, "--teacher", original, "--images", images, "-o", converted),
        ("convert", original, "-o", original, "--calibrate", images),
        ("quantize", converted, "--calib-images", images, "-o", converted),
    )
    for args in calls:
        assert_one_line_error(cli(*args), 2, "would overwrite")
    assert {p: p.read_bytes() for p in before} == before


def test_calibrate_verdict_says_better_worse_or_not_resolved_by_the_paired_interval():
    from types import SimpleNamespace

    from aa_deploy.calibration.held_out import Figures
    from aa_deploy.calibration.report import verdict
    from aa_deploy.consistency.paired import PairedDelta

    result = SimpleNamespace(
        versus_teacher={
            "random-crop": PairedDelta(-0.012, (-0.027, 0.002), 100),
            "diagonal": PairedDelta(-0.02, (-0.035, -0.004), 100),
            "pad-and-crop": PairedDelta(0.016, (0.004, 0.027), 100),
        },
        after=Figures(fidelity=0.953),
    )
    assert verdict(result) == (
        "random-crop consistency not resolved (-1.2, -2.7 to +0.2); diagonal consistency WORSE (-2.0, -3.5 to -0.4); "
        "pad-and-crop consistency BETTER (+1.6, +0.4 to +2.7); answers as the original's on 95.3 % of shifted views"
    )


def test_ctrl_c_while_the_libraries_load_is_one_line(monkeypatch, capsys):
    """Ctrl-C while the command line's modules load (torch and the subcommands take seconds): one line
    and exit 130, not a 41-line KeyboardInterrupt traceback. The interrupt is raised where the import
    happens, so the test does not depend on timing."""
    import sys
    import types

    from aa_deploy import __main__ as entry

    class Interrupted(types.ModuleType):
        def __getattr__(self, name):
            raise KeyboardInterrupt

    monkeypatch.setitem(sys.modules, "aa_deploy.cli", Interrupted("aa_deploy.cli"))
    assert entry.main() == 130
    err = capsys.readouterr().err
    assert err.strip() == "aa-deploy: interrupted"
