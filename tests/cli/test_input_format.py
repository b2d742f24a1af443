"""Image inputs the way users export them: NHWC, grayscale, non-square, float16. Every image-fed command
reads the layout, channels, height x width and float type from the graph, feeds them, or refuses in one line."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnxconverter_common import float16
from PIL import Image

import aa_deploy
from aa_deploy.common import bundled, model_io
from aa_deploy.common.errors import InputError
from aa_deploy.common.images import Preprocess, normalize
from aa_deploy.common.input_format import InputFormat, from_dims
from aa_deploy.converters.export import export
from tests.helpers import calibrate, cli


class Net(torch.nn.Module):
    """Two strided convs and a classifier; `nhwc` takes channels-last images and transposes them first."""

    def __init__(self, channels: int = 3, nhwc: bool = False) -> None:
        super().__init__()
        self.nhwc = nhwc
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(channels, 8, 3, stride=2, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, 16, 3, stride=2, padding=1),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
        )
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.features(x.permute(0, 3, 1, 2) if self.nhwc else x))


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The same trained-free net exported NCHW, NHWC, grayscale, non-square and float16, each converted."""
    folder = tmp_path_factory.mktemp("formats")
    torch.manual_seed(0)
    rgb = Net()
    nhwc = Net(nhwc=True)
    nhwc.load_state_dict(rgb.state_dict())
    paths = {
        "nchw": export(rgb, folder / "nchw.onnx", (2, 3, 32, 32)),
        "nhwc": export(nhwc, folder / "nhwc.onnx", (2, 32, 32, 3)),
        "gray": export(Net(channels=1), folder / "gray.onnx", (2, 1, 32, 32)),
        "wide": export(Net(), folder / "wide.onnx", (2, 3, 24, 40)),
    }
    half = float16.convert_float_to_float16(onnx.load(str(paths["nchw"])), keep_io_types=False)
    onnx.save(half, str(folder / "half.onnx"))
    paths["half"] = folder / "half.onnx"
    for name in list(paths):
        paths[f"{name}.aa"] = folder / f"{name}.aa.onnx"
        aa_deploy.convert(paths[name], paths[f"{name}.aa"])
    images = folder / "images"
    images.mkdir()
    for i, img in enumerate(bundled.cifar_test_images()[0][:30]):
        Image.fromarray(img).save(images / f"{i:02d}.png")
    paths["images"] = images
    return paths


@pytest.mark.parametrize(
    ("dims", "dtype", "layout", "expected"),
    [
        (["N", 3, 224, 224], "float32", None, InputFormat("NCHW", 3, 224, 224)),
        ([1, 224, 224, 3], "float32", None, InputFormat("NHWC", 3, 224, 224)),
        (["N", 1, 28, 28], "float16", None, InputFormat("NCHW", 1, 28, 28, "float16")),
        (["N", "h", "w", 1], "float32", None, InputFormat("NHWC", 1, None, None)),
        (["N", "c", "h", "w"], "float32", None, InputFormat("NCHW", 3, None, None)),
        (["N", "h", "w", "c"], "float32", "NHWC", InputFormat("NHWC", 3, None, None)),
        ([1, 3, 24, 40], "float32", None, InputFormat("NCHW", 3, 24, 40)),
    ],
)
def test_the_input_format_is_read_from_the_dims(dims, dtype, layout, expected):
    assert from_dims(dims, dtype, layout) == expected


@pytest.mark.parametrize(
    ("dims", "dtype", "layout", "needle"),
    [
        ([1, 3, 224], "float32", None, "4-D input"),
        ([1, 3, 224, 224], "int64", None, "is int64"),
        ([1, 5, 224, 224], "float32", None, "neither 1 nor 3 channels"),
        ([1, 224, 224, 3], "float32", "NCHW", "224 channels"),
        ([1, 3, 224, 224], "float32", "NWHC", "--layout must be"),
    ],
)
def test_an_input_aa_deploy_cannot_feed_is_one_line(dims, dtype, layout, needle):
    with pytest.raises(InputError, match=needle):
        from_dims(dims, dtype, layout)


def test_an_input_size_is_one_side_or_height_by_width():
    assert from_dims([1, 3, 24, 40], "float32").size() == (24, 40)
    assert from_dims([1, 3, 24, 24], "float32").size() == 24
    assert from_dims([1, 24, 40, 3], "float32").size() == (24, 40)  # NHWC
    assert from_dims(["N", 3, "H", "W"], "float32").size() is None
    assert Preprocess(size=(24, 24)).size == 24 and Preprocess(size=[24, 40]).size == (24, 40)
    for bad in ((24, 0), (24, 40, 3), 2.5):
        with pytest.raises(InputError, match="size"):
            Preprocess(size=bad)


def test_a_rectangular_crop_is_torchvisions_resize_and_centre_crop(tmp_path):
    # Independent reference: torchvision's Resize (short side, bilinear, on the PIL image) and CenterCrop.
    # Sizes whose long side scales to whole pixels and whose margins are even, where torchvision rounds as we do.
    from torchvision import transforms

    from aa_deploy.common.images import load_rgb

    rng = np.random.default_rng(0)
    for (w, h), size, resize in (((120, 60), (24, 40), 40), ((60, 100), (24, 40), 48), ((90, 90), (30, 20), 40)):
        path = tmp_path / f"{w}x{h}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        got = load_rgb(path, Preprocess(size=size, resize=resize))
        want = np.asarray(
            transforms.CenterCrop(size)(
                transforms.Resize(resize, interpolation=transforms.InterpolationMode.BILINEAR)(Image.open(path))
            )
        )
        assert got.shape == (*size, 3)
        np.testing.assert_array_equal(got, want)


def test_without_a_resize_the_short_side_keeps_the_usual_ratio_where_the_image_has_the_pixels(tmp_path):
    from aa_deploy.common.images import default_resize, load_rgb

    rng = np.random.default_rng(1)
    # (image w x h, crop, the resize it must equal): a photo larger than 256/224 of the crop is resized with
    # that ratio; one between the crop and that is cropped as it is; a smaller one is resized up to the crop.
    for (w, h), size, resize in (
        ((400, 300), 224, 256),
        ((300, 227), 224, 227),
        ((60, 50), 32, 37),
        ((32, 32), 32, 32),
        ((20, 28), 32, 32),
        ((300, 200), (128, 160), 183),
    ):
        path = tmp_path / f"{w}x{h}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        assert default_resize(max(size) if isinstance(size, tuple) else size, min(w, h)) == resize
        np.testing.assert_array_equal(
            load_rgb(path, Preprocess(size=size)), load_rgb(path, Preprocess(size=size, resize=resize))
        )
    # a different resize gives a different crop: the comparison above can fail
    assert not np.array_equal(
        load_rgb(path, Preprocess(size=(128, 160))), load_rgb(path, Preprocess(size=(128, 160), resize=160))
    )


def test_grayscale_is_the_luma_pil_computes_and_layouts_are_transposes():
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    gray = normalize(images, Preprocess(size=8, mean=(0.0,), std=(1.0,)), InputFormat("NCHW", 1))
    pil = np.stack([np.asarray(Image.fromarray(im).convert("L")) for im in images]) / 255.0
    assert gray.shape == (4, 1, 8, 8) and np.abs(gray[:, 0] - pil).max() <= 1 / 255 + 1e-6
    nchw = normalize(images, Preprocess(size=8))
    nhwc = normalize(images, Preprocess(size=8), InputFormat("NHWC"))
    half = normalize(images, Preprocess(size=8), InputFormat(dtype="float16"))
    assert np.array_equal(nhwc, nchw.transpose(0, 2, 3, 1)) and nhwc.flags.c_contiguous
    assert half.dtype == np.float16 and np.allclose(half, nchw, atol=2e-3)
    with pytest.raises(InputError, match="1-channel images and the preprocessing normalizes 3"):
        normalize(images, Preprocess(size=8), InputFormat(channels=1))


def test_the_bundled_cifar_images_feed_rgb_inputs_in_their_layout_and_refuse_grayscale():
    images = bundled.cifar_test_images()[0][:4]
    nchw = bundled.cifar_normalize(images)
    nhwc = bundled.cifar_feed(InputFormat("NHWC"))(images)
    assert np.array_equal(nhwc, nchw.transpose(0, 2, 3, 1)) and nhwc.flags.c_contiguous
    assert bundled.cifar_feed(InputFormat(dtype="float16"))(images).dtype == np.float16
    with pytest.raises(InputError, match="bundled CIFAR-10 images are RGB"):
        bundled.cifar_feed(InputFormat(channels=1))


def test_an_nhwc_model_calibrates_exactly_as_its_nchw_twin(made, tmp_path):
    """The same weights exported both ways, calibrated on the same images: the same result, so the NHWC
    model was fed its images at 32x32 with 3 channels (not at 3x3 px, reading the size off the last axis)."""
    results = {}
    for name in ("nchw", "nhwc"):
        out = tmp_path / f"{name}.cal.onnx"
        calibrate(made[f"{name}.aa"], made[name], made["images"], out, method="stats")
        meta = model_io.read_metadata(onnx.load(str(out)))["calibration"]
        results[name] = (out, meta)
    nchw, nhwc = results["nchw"][1]["input"], results["nhwc"][1]["input"]
    assert nhwc["layout"] == "NHWC" and nhwc["view"] == [32, 32] and nhwc["channels"] == 3
    assert nchw["layout"] == "NCHW" and nchw["view"] == [32, 32]
    a, b = (
        {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
        for path, _ in results.values()
    )
    convs = [k for k in a if k.endswith("weight")]
    assert len(convs) == 3 and all(k in b for k in convs)
    assert all(np.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in convs)
    assert any(
        not np.allclose(a[k], onnx.numpy_helper.to_array(i))
        for k in convs
        for i in onnx.load(str(made["nchw.aa"])).graph.initializer
        if i.name == k
    )  # calibration changed them


def test_a_grayscale_model_calibrates_with_its_own_normalization(made, tmp_path):
    base = ("calibrate", made["gray.aa"], "--teacher", made["gray"], "--images", made["images"], "--method", "stats")
    proc = cli(*base, "-o", tmp_path / "a.onnx")
    assert proc.returncode == 2 and "1-channel images" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "a.onnx").exists()
    proc = cli(*base, "--mean", "0.45", "--std", "0.25", "-o", tmp_path / "b.onnx")
    assert proc.returncode == 0, proc.stderr
    meta = model_io.read_metadata(onnx.load(str(tmp_path / "b.onnx")))["calibration"]
    assert meta["input"]["channels"] == 1 and meta["preprocess"]["mean"] == [0.45]


def test_calibrate_fits_a_non_square_model_on_rectangular_crops(made, tmp_path):
    # 24x40 (height x width): the images resized (short side 40) and centre-cropped to 24x40; canvas views
    # with a larger resize, 8 px of room both ways. The written model's figures come from 24x40 views.
    out = tmp_path / "o.onnx"
    pre = tmp_path / "pre.json"
    pre.write_text(json.dumps({"size": [24, 40], "resize": 48, "mean": [0.5] * 3, "std": [0.25] * 3}))
    proc = cli(
        "calibrate", made["wide.aa"], "--teacher", made["wide"], "--images", made["images"], "--preprocess", pre,
        "--epochs", "1", "--lr", "1e-4", "-o", out,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    meta = model_io.read_metadata(onnx.load(str(out)))["calibration"]
    assert meta["preprocess"]["size"] == [24, 40] and meta["input"]["view"] == [24, 40] and meta["views"] == "canvas"
    assert set(meta["after"]) >= {"consistency_random_crop", "consistency_diagonal"}
    # the default preprocessing: the model's own size, resized to its longer side (no canvas room: shifts)
    proc = cli("calibrate", made["wide.aa"], "--teacher", made["wide"], "--images", made["images"],
               "--method", "stats", "-o", tmp_path / "s.onnx")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    meta = model_io.read_metadata(onnx.load(str(tmp_path / "s.onnx")))["calibration"]
    assert meta["preprocess"]["size"] == [24, 40] and meta["views"] == "shift"
    # a preprocessing of another shape is refused in one line
    proc = cli("calibrate", made["wide.aa"], "--teacher", made["wide"], "--images", made["images"], "--size", "40x24",
               "-o", tmp_path / "x.onnx")  # fmt: skip
    assert proc.returncode == 2 and "40x24 (height x width)" in proc.stderr and "24x40" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.onnx").exists()


def test_calibrate_fits_a_float16_model_in_float32_and_writes_its_float16_graph_back(made, tmp_path):
    # The reference: the float16 pair widened to float32 by hand (every float16 value is exact in float32)
    # and calibrated alike. The float16 result must hold exactly those weights rounded to float16, in the
    # float16 graph as it was (its nodes, its float16 input), and run under ONNX Runtime as such.
    from onnx import numpy_helper

    from aa_deploy.converters.precision import is_float16, widen_float16

    wide = {}
    for name in ("half", "half.aa"):
        wide[name] = tmp_path / f"{name}.f32.onnx"
        model_io.save(widen_float16(model_io.load(made[name])), wide[name], external=False)
        assert not is_float16(model_io.load(wide[name]))
    out16, out32 = tmp_path / "c16.onnx", tmp_path / "c32.onnx"
    for student, teacher, out in ((made["half.aa"], made["half"], out16), (wide["half.aa"], wide["half"], out32)):
        proc = cli(
            "calibrate", student, "--teacher", teacher, "--images", made["images"], "--method", "reconstruct",
            "-o", out,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
    m16, m32, given = (onnx.load(str(p)) for p in (out16, out32, made["half.aa"]))
    assert m16.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    ops = [n.op_type for n in given.graph.node if n.op_type != "Constant"]
    assert [n.op_type for n in m16.graph.node if n.op_type != "Constant"] == ops
    before = {i.name: numpy_helper.to_array(i) for i in given.graph.initializer}
    after32 = {i.name: numpy_helper.to_array(i) for i in m32.graph.initializer}
    changed = 0
    for init in m16.graph.initializer:
        got = numpy_helper.to_array(init)
        np.testing.assert_array_equal(got, after32[init.name].astype(got.dtype), err_msg=init.name)
        if init.name in before:
            assert got.dtype == before[init.name].dtype
            changed += not np.array_equal(got, before[init.name])
    assert changed > 0
    assert "float16" in model_io.read_metadata(m16)["calibration"]["precision"]
    x = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    session16, session32 = (ort.InferenceSession(str(p)) for p in (out16, out32))
    y16 = session16.run(None, {session16.get_inputs()[0].name: x.astype(np.float16)})[0].astype(np.float32)
    y32 = session32.run(None, {session32.get_inputs()[0].name: x})[0]
    assert np.abs(y16 - y32).max() < 0.02 * np.abs(y32).max()


def test_consistency_and_quantize_feed_nhwc_float16_and_non_square_inputs(made, tmp_path):
    for name in ("nhwc", "half"):
        report = tmp_path / f"{name}.json"
        proc = cli(
            "consistency", made[name], "--compare", made[f"{name}.aa"], "--images", made["images"],
            "--passes", "1", "--report", report,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        measured = json.loads(report.read_text())["models"][str(made[name])]
        assert measured["images"] == 30 and measured["settings"]["crop"] == 32
    for protocol, shift in (("random-crop", "8"), ("one-pixel", "4"), ("diagonal", "4")):
        report = tmp_path / f"wide-{protocol}.json"
        proc = cli(
            "consistency", made["wide"], "--compare", made["wide.aa"], "--images", made["images"], "--protocol",
            protocol, "--shift", shift, "--passes", "1", "--report", report, "--no-latency",
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        measured = json.loads(report.read_text())["models"][str(made["wide.aa"])]
        assert measured["images"] == 30 and measured["settings"]["crop"] == [24, 40], measured["settings"]
    proc = cli("quantize", made["nhwc.aa"], "--calib-images", made["images"], "-o", tmp_path / "q.onnx")
    assert proc.returncode == 0, proc.stderr
    proc = cli("quantize", made["wide.aa"], "--calib-images", made["images"], "-o", tmp_path / "w.onnx")
    assert proc.returncode == 0, proc.stderr


def test_verify_feeds_images_as_the_graph_takes_them(made):
    from aa_deploy.verification.parity import Inputs, make_inputs

    x, info = make_inputs(made["nhwc"], Inputs(str(made["images"]), count=4))
    assert x.shape == (4, 32, 32, 3) and x.dtype == np.float32 and info["shape"] == [32, 32, 3]
    x, _ = make_inputs(made["half"], Inputs(str(made["images"]), count=4))
    assert x.shape == (4, 3, 32, 32) and x.dtype == np.float16
    x, _ = make_inputs(made["gray"], Inputs(str(made["images"]), Preprocess(32, None, (0.5,), (0.5,))))
    assert x.shape[1:] == (1, 32, 32)
