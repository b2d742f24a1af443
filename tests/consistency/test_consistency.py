"""The shift-consistency metrics proven on models whose shift behaviour is known by hand."""

from __future__ import annotations

import numpy as np
import pytest

from aa_deploy.consistency import measure, wilson


def identity_prepare(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32).transpose(0, 3, 1, 2)


def global_pool_classifier(x: np.ndarray) -> np.ndarray:
    """Class = channel with the largest mean: exactly invariant to circular shifts."""
    return x.mean(axis=(2, 3))


def strided_slice_classifier(x: np.ndarray) -> np.ndarray:
    """Class = channel with the largest mean over x[:, :, ::2, ::2]: sees only even pixels."""
    return x[:, :, ::2, ::2].mean(axis=(2, 3))


def checkerboard(n: int = 400, size: int = 8) -> np.ndarray:
    """Channel 0 is 1 on (even, even) pixels, channel 1 is 0.6 everywhere: the strided model says
    class 0 exactly when both shifts are even."""
    img = np.zeros((size, size, 2), np.float32)
    img[::2, ::2, 0] = 1.0
    img[:, :, 1] = 0.6
    return np.repeat(img[None], n, axis=0)


def noise_images(n: int = 64, size: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, size, size, 3)).astype(np.float32)


@pytest.mark.parametrize("protocol", ["circular", "worst-case"])
def test_global_average_pool_is_exactly_circular_shift_invariant(protocol):
    images = noise_images()
    if protocol == "worst-case":
        from aa_deploy.consistency.protocols import Harness, worst_case

        result = worst_case(Harness(global_pool_classifier, identity_prepare), images, crop=8, shift=2, circular=True)
    else:
        result = measure(protocol, global_pool_classifier, identity_prepare, images, crop=8, shift=3, passes=3)
    assert result.consistency == 1.0


def test_strided_slice_random_circular_pairs_match_hand_computed_rate():
    # shifts in {-1, 0, 1}^2: class 0 only at (0, 0), p = 1/9; a pair agrees with p^2 + (1-p)^2 = 65/81.
    result = measure(
        "circular", strided_slice_classifier, identity_prepare, checkerboard(2000), crop=8, shift=1, passes=3
    )
    assert result.consistency == pytest.approx(65 / 81, abs=0.015)
    lo, hi = result.ci95
    assert lo < 65 / 81 < hi


def test_strided_slice_worst_case_is_never_consistent():
    from aa_deploy.consistency.protocols import Harness, worst_case

    result = worst_case(
        Harness(strided_slice_classifier, identity_prepare), checkerboard(10), crop=8, shift=1, circular=True
    )
    assert result.consistency == 0.0


def test_diagonal_curve_alternates_for_the_strided_model():
    images = checkerboard(5, size=12)
    labels = np.zeros(5, int)
    result = measure("diagonal", strided_slice_classifier, identity_prepare, images, crop=8, shift=4, labels=labels)
    assert result.curve["offset"] == [0, 1, 2, 3, 4]
    assert result.curve["agreement"] == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert result.curve["accuracy"] == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert result.consistency == pytest.approx(0.5)


def test_diagonal_pad_and_crop_is_centred_on_the_unshifted_image():
    images = checkerboard(5, size=8)
    result = measure("diagonal", strided_slice_classifier, identity_prepare, images, crop=8, shift=2, pad="reflect")
    assert result.curve["offset"] == [-2, -1, 0, 1, 2]
    assert result.curve["agreement"][2] == 1.0 and result.curve["agreement"][1] == 0.0


def test_random_crop_pad_and_crop_keeps_size_and_counts_accuracy():
    images = noise_images(50, size=8)
    labels = global_pool_classifier(identity_prepare(images)).argmax(1)
    result = measure(
        "random-crop",
        global_pool_classifier,
        identity_prepare,
        images,
        crop=8,
        shift=2,
        passes=2,
        pad="reflect",
        labels=labels,
    )
    assert result.settings["crop"] == 8 and result.views == 2 * 2 * 50
    assert 0.0 < result.accuracy <= 1.0 and 0.0 < result.consistency <= 1.0


def mixed_images(n: int = 20, size: int = 8) -> np.ndarray:
    """Half checkerboards (the strided model flips with the shift's parity), half flat images on
    which class 1 wins at every shift (consistent): the agreement is clustered by image."""
    flat = np.zeros((size, size, 2), np.float32)
    flat[:, :, 1] = 0.6
    return np.concatenate([checkerboard(n // 2, size), np.repeat(flat[None], n - n // 2, axis=0)])


@pytest.mark.parametrize("protocol", ["random-crop", "circular", "diagonal", "worst-case"])
def test_per_image_rates_average_to_the_consistency(protocol):
    images = mixed_images(12, size=12)
    if protocol == "worst-case":
        from aa_deploy.consistency.protocols import Harness, worst_case

        result = worst_case(Harness(strided_slice_classifier, identity_prepare), images, crop=8, shift=1, circular=True)
    else:
        result = measure(
            protocol, strided_slice_classifier, identity_prepare, images, crop=8, shift=2, passes=4, pad="zero"
        )
    assert len(result.per_image) == 12
    assert np.mean(result.per_image) == pytest.approx(result.consistency)
    assert result.per_image[6:] == [1.0] * 6  # the flat images never flip
    assert min(result.per_image[:6]) < 1.0


def test_interval_is_over_images_and_does_not_shrink_with_more_passes():
    # 20 images, 200 passes: 4,000 pairs, whose Wilson interval would be +-1.3 points; but only 10
    # images can flip, so the image-level interval must stay wide (and contain the true rate).
    images = mixed_images(20)
    result = measure("circular", strided_slice_classifier, identity_prepare, images, crop=8, shift=1, passes=200)
    truth = (65 / 81 + 1) / 2
    lo, hi = result.ci95
    assert lo < truth < hi
    assert hi - lo > 0.05
    assert np.subtract(*wilson(int(result.consistency * 4000), 4000)[::-1]) < 0.03


def test_bootstrap_interval_matches_plain_resampling_of_images():
    from aa_deploy.consistency.paired import bootstrap_ci

    rng = np.random.default_rng(5)
    for values in (rng.integers(0, 11, 100) / 10, rng.random(40), np.r_[np.ones(95), np.zeros(5)]):
        means = values[rng.integers(0, len(values), size=(40_000, len(values)))].mean(axis=1)
        assert bootstrap_ci(values) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])), abs=0.01)
    assert bootstrap_ci(np.ones(30)) == (1.0, 1.0)


def test_paired_difference_of_a_model_with_itself_is_exactly_zero():
    from aa_deploy.consistency.paired import paired_difference

    images = mixed_images(20)
    r = measure("circular", strided_slice_classifier, identity_prepare, images, crop=8, shift=1, passes=5)
    d = paired_difference(r, r)
    assert d.delta == 0.0 and d.ci95 == (0.0, 0.0) and not d.resolved


def test_paired_difference_resolves_an_invariant_model_against_a_strided_one():
    from aa_deploy.consistency.paired import paired_difference

    images = checkerboard(300)
    runs = [
        measure("circular", model, identity_prepare, images, crop=8, shift=1, passes=5, seed=3)
        for model in (strided_slice_classifier, global_pool_classifier)
    ]
    d = paired_difference(*runs)
    assert runs[1].consistency == 1.0
    assert d.delta == pytest.approx(1.0 - runs[0].consistency) and d.delta == pytest.approx(16 / 81, abs=0.04)
    assert 0 < d.ci95[0] <= d.delta <= d.ci95[1] and d.resolved
    reverse = paired_difference(runs[1], runs[0])
    assert reverse.delta == -d.delta and reverse.resolved
    with pytest.raises(ValueError, match="same images"):
        paired_difference(
            runs[0], measure("circular", global_pool_classifier, identity_prepare, images[:5], crop=8, shift=1)
        )


def test_wilson_interval():
    lo, hi = wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert wilson(0, 0) == (0.0, 1.0)


def test_cli_compares_models_and_writes_report_and_plot(tmp_path):
    import json

    import aa_deploy
    from aa_deploy.common import bundled
    from aa_deploy.converters.export import export
    from tests.helpers import cli

    plain = export(bundled.resnet20(), tmp_path / "r20.onnx", (2, 3, 32, 32))
    aa_deploy.convert(plain, tmp_path / "r20.aa.onnx")
    report, png = tmp_path / "c.json", tmp_path / "c.png"
    proc = cli(
        "consistency",
        str(plain),
        "--compare",
        str(tmp_path / "r20.aa.onnx"),
        "--protocol",
        "circular",
        "--passes",
        "2",
        "--report",
        str(report),
        "--plot",
        str(png),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(report.read_text())
    assert data["schema"] == "aa-deploy.consistency/3" and len(data["models"]) == 2
    assert set(data["cost"]) == set(data["models"]) and data["requirements"] == [] and data["passed"]
    original, converted = data["models"][str(plain)], data["models"][str(tmp_path / "r20.aa.onnx")]
    assert original["images"] == 100 and 0.8 < original["consistency"] <= 1.0 and original["accuracy"] > 0.85
    versus = data["versus_first"][str(tmp_path / "r20.aa.onnx")]
    assert versus["delta"] == pytest.approx(converted["consistency"] - original["consistency"])
    assert versus["ci95"][0] <= versus["delta"] <= versus["ci95"][1] and versus["images"] == 100
    assert "vs first" in proc.stdout
    assert png.read_bytes()[:4] == b"\x89PNG"
    bad = cli("consistency", plain, "--images", tmp_path / "none")
    assert bad.returncode == 2 and "no such image folder" in bad.stderr


def _slice_model(tmp_path, blurred: bool):
    """X -> Slice(step 2 on H and W) -> Y; converted with the binomial filter when `blurred`."""
    from onnx import helper

    import aa_deploy
    from tests import graphs as G

    nodes = [helper.make_node("Slice", ["X", "st", "en", "ax", "step"], ["Y"], name="subsample")]
    inits = [G.ints("st", [0, 0]), G.ints("en", [2**62, 2**62]), G.ints("ax", [2, 3]), G.ints("step", [2, 2])]
    m = G.model(nodes, [G.inp("X", ["N", 1, 16, 16])], [G.out("Y", 4)], inits)
    path = tmp_path / "slice.onnx"
    import onnx

    onnx.save(m, path)
    if not blurred:
        return path
    aa_deploy.convert(path, tmp_path / "slice.aa.onnx", aa_deploy.Options(filter="binomial", pad="zero"))
    return tmp_path / "slice.aa.onnx"


def test_probe_sees_aliasing_of_a_plain_strided_slice_and_less_after_a_binomial_blur(tmp_path):
    from aa_deploy.consistency.probe import probe

    # A low-frequency pattern (period 16 px) plus a high-frequency one (period 8/3 px, above the Nyquist
    # frequency of a stride-2 subsampling): energy above Nyquist = 0.6^2 / (1 + 0.6^2) = 0.26.
    yy, xx = np.mgrid[0:16, 0:16]
    pattern = np.cos(np.pi / 8 * xx) * np.cos(np.pi / 8 * yy) + 0.6 * np.cos(np.pi * 0.75 * xx) * np.cos(
        np.pi * 0.75 * yy
    )
    x = np.stack([pattern, np.roll(pattern, 3, axis=1)])[:, None].astype(np.float32)
    (plain,) = probe(_slice_model(tmp_path, False), x)
    (blurred,) = probe(_slice_model(tmp_path, True), x)
    assert plain.aliasing == pytest.approx(0.36 / 1.36, abs=0.02)
    assert blurred.aliasing < 0.1 * plain.aliasing
    # A strided slice is exactly equivariant to shifts by its stride (circular shifts, no padding involved).
    assert plain.cumulative_stride == [2, 2] and plain.equivariance_error < 1e-6
    # ...but under a one-pixel shift the aliased component moves the output far beyond interpolation,
    # and much less so after the blur.
    # Blurred, only the low component is left: bilinear interpolation of cos(pi/4 per cell) at half a cell
    # in both axes misses by exactly 1 - cos(pi/8)^2; the aliased plain output misses by twice that.
    assert blurred.subpixel_error == pytest.approx(1 - np.cos(np.pi / 8) ** 2, abs=0.005)
    assert plain.subpixel_error > 2 * blurred.subpixel_error


def test_probe_cli_on_the_trained_resnet20(tmp_path):
    import json

    import aa_deploy
    from aa_deploy.common import bundled
    from aa_deploy.converters.export import export
    from tests.helpers import cli

    plain = export(bundled.resnet20(), tmp_path / "r20.onnx", (2, 3, 32, 32))
    aa_deploy.convert(plain, tmp_path / "r20.aa.onnx", aa_deploy.Options(mode="blurpool"))
    report, png = tmp_path / "p.json", tmp_path / "p.png"
    proc = cli(
        "probe",
        str(plain),
        "--compare",
        str(tmp_path / "r20.aa.onnx"),
        "--count",
        "16",
        "--report",
        str(report),
        "--plot",
        str(png),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    models = json.loads(report.read_text())["models"]
    before, after = models[str(plain)], models[str(tmp_path / "r20.aa.onnx")]
    assert [p["kind"] for p in before] == ["strided-conv", "strided-slice"] * 2
    assert len(after) == 4 and all(a["aliasing"] < 0.5 * b["aliasing"] for a, b in zip(after, before))
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "protocol,pad",
    [
        ("random-crop", "zero"),
        ("random-crop", None),
        ("circular", None),
        ("diagonal", "reflect"),
        ("diagonal", None),
        ("worst-case", "zero"),
    ],
)
def test_progress_reports_every_view(protocol, pad):
    from aa_deploy.consistency.protocols import view_count

    images = noise_images(6, size=12)
    seen = []
    result = measure(
        protocol,
        global_pool_classifier,
        identity_prepare,
        images,
        crop=8,
        shift=2,
        passes=2,
        pad=pad,
        batch=5,
        progress=seen.append,
    )
    total = view_count(protocol, 6, shift=2, passes=2, pad=pad)
    assert [e.total for e in seen] == [total] * len(seen) and {e.task for e in seen} == {"views"}
    assert seen[-1].done == result.views == total  # the count climbs batch by batch to every view run
    assert [e.done for e in seen] == sorted({e.done for e in seen})


@pytest.mark.parametrize("protocol", ["circular", "random-crop"])
def test_image_folder_views_have_the_model_input_size(tmp_path, protocol):
    # Circular shifts keep the image size; canvas crops load images `shift` px larger. A folder of
    # 32-px images used to come back 34 px for circular shifts, and ONNX Runtime refused them.
    from PIL import Image

    from aa_deploy.common import bundled
    from aa_deploy.consistency.compare import Images, Measurement
    from aa_deploy.consistency.sides import Models, measure_models
    from aa_deploy.converters.export import export

    images, labels = bundled.cifar_test_images()
    for i in range(8):
        (tmp_path / "imgs" / str(labels[i])).mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(tmp_path / "imgs" / str(labels[i]) / f"{i}.png")
    model = export(bundled.resnet20(), tmp_path / "r20.onnx", (2, 3, 32, 32))
    results, data = measure_models(Models((model,)), Measurement(protocol, passes=2), Images(str(tmp_path / "imgs")))
    assert data.images.shape[1:3] == ((32, 32) if protocol == "circular" else (32 + 32, 32 + 32))
    assert next(iter(results.values())).images == 8


def test_one_pixel_steps_of_the_strided_model_never_agree():
    """The strided model flips its class at every one-pixel diagonal step of the checkerboard (its even
    pixels change parity), and the global-pool model never does on the same canvases."""
    images = checkerboard(6, size=16)
    strided = measure("one-pixel", strided_slice_classifier, identity_prepare, images, crop=8, shift=8)
    assert strided.consistency == 0.0 and strided.views == 9 * 6 and strided.settings["steps"] == 8
    pooled = measure("one-pixel", global_pool_classifier, identity_prepare, noise_images(6, size=16), crop=8, shift=8)
    assert pooled.consistency == pytest.approx(float(np.mean(pooled.per_image))) and 0.0 <= pooled.consistency <= 1.0


def test_one_pixel_rate_counts_each_step_by_hand():
    """A classifier that answers by the parity of the view's top-left pixel on an image whose rows
    0..3 are marked: views at (d, d) for d = 0..4 answer 1, 1, 1, 1, 0 -> 3 of 4 steps agree."""
    img = np.zeros((12, 12, 2), np.float32)
    img[:, :, 1] = 0.5
    img[:4, :4, 0] = 1.0

    def corner(x: np.ndarray) -> np.ndarray:
        return x[:, :, 0, 0]

    result = measure("one-pixel", corner, identity_prepare, img[None], crop=8, shift=4)
    assert result.per_image == [0.75]


def test_one_pixel_without_room_for_its_steps_is_one_line():
    from aa_deploy.common.errors import InputError

    with pytest.raises(InputError, match="one-pixel needs room"):
        measure("one-pixel", global_pool_classifier, identity_prepare, noise_images(2, size=8), crop=8, shift=4)


def test_an_argmax_output_is_scored_as_labels(tmp_path):
    """The trained ResNet-20 exported with an argmax head (int64 class labels) gets exactly the
    agreement of the same network's logits, view by view; before, labels were scored by cosine."""
    import torch

    from aa_deploy.common import bundled
    from aa_deploy.consistency.compare import Images, Measurement
    from aa_deploy.consistency.sides import Models, measure_models

    class Labels(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x).argmax(1)

    net = bundled.resnet20()
    paths = {}
    for name, module in (("logits", net), ("labels", Labels(net))):
        paths[name] = tmp_path / f"{name}.onnx"
        torch.onnx.export(
            module.eval(), torch.zeros(1, 3, 32, 32), paths[name], dynamo=False, opset_version=13,
            input_names=["input"], dynamic_axes={"input": {0: "N"}},
        )  # fmt: skip
    for protocol in ("random-crop", "one-pixel"):
        models = Models((paths["logits"], paths["labels"]))
        results, _ = measure_models(models, Measurement(protocol, passes=2), Images("bundled:cifar10"))
        logits, labels = results[str(paths["logits"])], results[str(paths["labels"])]
        assert labels.metric == "top-1 agreement" and labels.per_image == logits.per_image
        assert labels.per_image_correct == logits.per_image_correct


@pytest.mark.parametrize("protocol", ["random-crop", "one-pixel", "diagonal", "worst-case"])
def test_rectangular_views_are_windows_of_the_canvas_at_equal_offsets(protocol):
    # Views of 6x10 (height x width) from canvases 3 px larger both ways: every view the model is fed is
    # the canvas window at some (y, x) within the room, and one-pixel/diagonal steps are diagonal: (d, d).
    rng = np.random.default_rng(0)
    canvases = rng.integers(0, 256, (5, 9, 13, 3), dtype=np.uint8)
    fed = []

    def run(x):
        fed.append(x)
        return np.stack([x.reshape(len(x), -1).sum(1), -x.reshape(len(x), -1).sum(1)], 1)

    result = measure(
        protocol, run, lambda v: v.transpose(0, 3, 1, 2).astype(np.float32), canvases, crop=(6, 10), shift=3,
        passes=2,
    )  # fmt: skip
    windows = {(y, x): canvases[:, y : y + 6, x : x + 10].transpose(0, 3, 1, 2) for y in range(4) for x in range(4)}
    for batch in fed:  # each batch holds one view of each canvas, in order
        assert batch.shape[1:] == (3, 6, 10)
        for i, view in enumerate(batch):
            found = [yx for yx, w in windows.items() if np.array_equal(w[i], view)]
            assert found, "a view that is no window of its canvas"
            if protocol in ("one-pixel", "diagonal"):
                assert any(y == x for y, x in found)
    assert result.settings["crop"] == (6, 10)
    assert len(fed) > 1
