"""`reconstruct`: least-squares refit of each conv against the teacher's conv outputs.

Independent reference: a student that is the teacher with its weights scrambled must get the
teacher's own weights back (every layer, in graph order), whatever the conv's stride, padding,
groups or kernel; and on the trained ResNet-20 after conversion, the refit must beat `stats`.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import aa_deploy
from aa_deploy.calibration.reconstruct import NormalEquations, calibrate_reconstruct
from aa_deploy.calibration.stats import calibrate_stats
from aa_deploy.common import bundled
from aa_deploy.converters.bridge import OnnxModule, load_module
from aa_deploy.converters.export import export
from tests.helpers import factor_spread


class Small(nn.Module):
    """Strided, padded, grouped, depthwise, asymmetric and pointwise convs, then a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise
            nn.ReLU(),
            nn.Conv2d(8, 12, (3, 1), padding=(1, 0), groups=2, bias=False),  # grouped, no bias
            nn.ReLU(),
            nn.Conv2d(12, 16, 1),
            nn.ReLU(),  # else the pooled features span 12 dimensions only, and the classifier is not unique
        )
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rec")
    torch.manual_seed(0)
    teacher = export(Small().eval(), folder / "t.onnx", (2, 3, 16, 16))
    model = onnx.load(teacher)
    rng = np.random.default_rng(1)
    for t in model.graph.initializer:  # the student: every weight and bias scrambled
        a = onnx.numpy_helper.to_array(t)
        if a.dtype != np.float32:
            continue  # shape constants
        t.CopyFrom(onnx.numpy_helper.from_array((a * rng.uniform(0.5, 1.5, a.shape) + 0.05).astype(a.dtype), t.name))
    onnx.save(model, folder / "s.onnx")
    return folder


def test_refit_recovers_the_teachers_weights(pair):
    _, teacher = load_module(pair / "t.onnx")
    _, student = load_module(pair / "s.onnx")
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((64, 3, 16, 16), dtype=np.float32))
    moved = {k: float((p - teacher.trainable()[k]).abs().max().detach()) for k, p in student.trainable().items()}
    assert min(moved.values()) > 1e-3  # scrambled for real
    report = calibrate_reconstruct(student, teacher, x, batch=24, ridges=(1e-9,))
    assert [r["refit"] for r in report] == [True] * 5  # four convs and the classifier
    for name, p in student.trainable().items():
        if name.startswith("features."):
            np.testing.assert_allclose(p.detach().numpy(), teacher.trainable()[name].detach().numpy(), atol=2e-4)
    # The classifier reads image-wide means, nearly collinear over noise images: its weights are not
    # pinned down, its outputs are.
    with torch.no_grad():
        np.testing.assert_allclose(student(x).numpy(), teacher(x).numpy(), atol=1e-4)
    assert max(r["residual"] for r in report) < 1e-6


def test_the_pointwise_start_refits_only_the_1x1_convs(pair):
    # `spatial=False`: the 3x3 / 3x1 convs keep their (scrambled) kernels up to one factor per output
    # channel (`stats`' rescaling); the 1x1 conv and the classifier are refit. Reference for the 1x1 conv:
    # NumPy's least squares from the student's own input at that conv to the teacher's output.
    _, teacher = load_module(pair / "t.onnx")
    _, student = load_module(pair / "s.onnx")
    before = {k: p.detach().clone() for k, p in student.trainable().items()}
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((64, 3, 16, 16), dtype=np.float32))
    report = calibrate_reconstruct(student, teacher, x, batch=24, ridges=(1e-9,), spatial=False)
    assert [r["refit"] for r in report] == [False, False, False, True, True]
    after = {k: p.detach() for k, p in student.trainable().items()}
    for i in (0, 2, 4):
        w0, w1 = before[f"features.{i}.weight"], after[f"features.{i}.weight"]
        assert factor_spread(w1, w0) < 1e-5  # one factor per output channel
        assert float((w1 / w0 - 1).abs().max()) > 1e-3  # and rescaled for real
    as_torch = {}  # both graphs' weights in the PyTorch module, to read the 1x1 conv's input and output
    for name, weights in (("student", after), ("teacher", {k: p.detach() for k, p in teacher.trainable().items()})):
        net = Small().eval()
        net.load_state_dict(weights)
        with torch.no_grad():
            as_torch[name] = net.features[:6](x), net.features[:7](x)
    cols = as_torch["student"][0].permute(0, 2, 3, 1).reshape(-1, 12).numpy().astype(np.float64)
    want = as_torch["teacher"][1].permute(0, 2, 3, 1).reshape(-1, 16).numpy().astype(np.float64)
    solution = np.linalg.lstsq(np.hstack([cols, np.ones((len(cols), 1))]), want, rcond=None)[0]
    np.testing.assert_allclose(after["features.6.weight"].reshape(16, 12).numpy(), solution[:12].T, atol=1e-4)
    np.testing.assert_allclose(after["features.6.bias"].numpy(), solution[12], atol=1e-4)


def test_ridge_pulls_towards_the_current_weights():
    rng = np.random.default_rng(0)
    cols = torch.from_numpy(rng.standard_normal((1, 5, 3)))  # fewer rows than it takes to pin 3 weights + bias
    y = torch.from_numpy(rng.standard_normal((1, 5, 2)))
    current = torch.from_numpy(rng.standard_normal((1, 3, 2)))
    eq = NormalEquations(1, 3, 2, torch.device("cpu"))
    eq.add(cols, y)
    heavy, _ = eq.solve(current, (1e6,), intercept=False)
    np.testing.assert_allclose(heavy.numpy(), current.numpy(), atol=1e-4)
    light, fit = eq.solve(current, (1e-12,), intercept=False)
    residual = fit["residual"]
    expected = np.linalg.lstsq(cols[0].numpy(), y[0].numpy(), rcond=None)[0]
    np.testing.assert_allclose(light[0].numpy(), expected, atol=1e-6)
    sse = ((cols[0].numpy() @ expected - y[0].numpy()) ** 2).sum(0)
    assert residual == pytest.approx(float(sse.sum() / (y[0].numpy() ** 2).sum()), rel=1e-6)


def test_reconstruct_beats_stats_on_the_trained_resnet20(tmp_path):
    """Converted ResNet-20, refit on 60 bundled CIFAR images, scored on the 40 others: each image's class
    probabilities are closer to the original's (KL divergence) after `reconstruct` than after `stats`, by
    more than the sample's noise: the paired 95 % interval of the per-image difference lies above zero."""
    from aa_deploy.consistency.paired import bootstrap_ci

    plain = export(bundled.resnet20(), tmp_path / "r20.onnx", (2, 3, 32, 32))
    aa_deploy.convert(plain, tmp_path / "r20.aa.onnx", aa_deploy.Options())
    images = torch.from_numpy(bundled.cifar_normalize(bundled.cifar_test_images()[0]))
    fit, check = images[:60], images[60:]
    teacher = OnnxModule(aa_deploy.common.model_io.load(plain)).eval()
    with torch.no_grad():
        target = torch.softmax(teacher(check), 1)

    def divergence(method) -> np.ndarray:
        student = OnnxModule(aa_deploy.common.model_io.load(tmp_path / "r20.aa.onnx")).eval()
        method(student, teacher, fit, 60)
        with torch.no_grad():
            log_p = torch.log_softmax(student(check), 1)
        return (target * (torch.log(target) - log_p)).sum(1).numpy()

    low, _ = bootstrap_ci(divergence(calibrate_stats) - divergence(calibrate_reconstruct))
    assert low > 0


class Residual(nn.Module):
    """conv1 -> relu(conv2 + shortcut) -> classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        h = self.conv1(x)
        return self.fc(torch.relu(self.conv2(h) + h).mean((2, 3)))


def test_a_conv_before_a_residual_add_corrects_the_other_branch(tmp_path, monkeypatch):
    """The student's shortcut is blurred (3x3 box, zero padding), a linear change that conv2, 3x3
    over the same tensor, can take up exactly (teacher conv2 + identity - box). Fit against the
    teacher's sum, the outputs match; fit against conv2's own output, the change stays."""
    import aa_deploy.calibration.reconstruct as reconstruct

    torch.manual_seed(0)
    teacher_path = export(Residual().eval(), tmp_path / "t.onnx", (2, 3, 12, 12))
    model = onnx.load(teacher_path)
    add = next(n for n in model.graph.node if n.op_type == "Add")
    shortcut = add.input[1]
    box = onnx.helper.make_node(
        "AveragePool", [shortcut], ["box"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1
    )
    add.input[1] = "box"
    model.graph.node.insert(list(model.graph.node).index(add), box)
    onnx.save(model, tmp_path / "s.onnx")
    teacher = OnnxModule(aa_deploy.common.model_io.load(teacher_path)).eval()
    x = torch.randn(64, 3, 12, 12)

    def error() -> float:
        student = OnnxModule(aa_deploy.common.model_io.load(tmp_path / "s.onnx")).eval()
        calibrate_reconstruct(student, teacher, x, 64, ridges=(1e-9,))
        with torch.no_grad():
            return float((student(x) - teacher(x)).abs().max() / teacher(x).abs().max())

    assert error() < 1e-4
    monkeypatch.setattr(reconstruct, "_merge_after", lambda node, names: None)
    assert error() > 1e-2


def test_cross_validation_picks_the_ridge_the_data_supports():
    """Many rows of a noisy linear map: the smallest ridge (the fit); fewer rows than weights, and a
    target unrelated to the features: the largest (stay at the current weights)."""
    rng = np.random.default_rng(0)
    ridges = (1e-6, 1e-2, 100.0)
    truth = rng.standard_normal((8, 3))
    current = torch.zeros(1, 8, 3, dtype=torch.float64)
    rich = NormalEquations(1, 8, 3, torch.device("cpu"))
    poor = NormalEquations(1, 8, 3, torch.device("cpu"))
    for fold in (0, 1):
        x = rng.standard_normal((500, 8))
        rich.add(
            torch.from_numpy(x)[None], torch.from_numpy(x @ truth + 0.01 * rng.standard_normal((500, 3)))[None], fold
        )
        x = rng.standard_normal((3, 8))
        poor.add(torch.from_numpy(x)[None], torch.from_numpy(rng.standard_normal((3, 3)))[None], fold)
    w, fit = rich.solve(current, ridges, intercept=False)
    assert fit["ridge"] == 1e-6 and np.abs(w[0].numpy() - truth).max() < 0.01
    _, fit = poor.solve(current, ridges, intercept=False)
    assert fit["ridge"] == 100.0


def test_after_blur_false_rescales_only_the_spatial_convs_that_read_a_blur(tmp_path):
    """Converted ResNet-20: its two blurs feed the strided 3x3 convs of the stage transitions. With
    `after_blur=False` exactly those get `stats`' rescaling (one factor per output channel of the
    converted weights); every other conv and the classifier are refit, as with the default."""
    from aa_deploy.common.inserted import reads_blurred

    plain = export(bundled.resnet20(), tmp_path / "r20.onnx", (2, 3, 32, 32))
    aa_deploy.convert(plain, tmp_path / "r20.aa.onnx", aa_deploy.Options())
    x = torch.from_numpy(bundled.cifar_normalize(bundled.cifar_test_images()[0][:40]))
    teacher = OnnxModule(aa_deploy.common.model_io.load(plain)).eval()
    student = OnnxModule(aa_deploy.common.model_io.load(tmp_path / "r20.aa.onnx")).eval()
    nodes = {n.name: n for n in student.nodes}
    before = {k: p.detach().clone() for k, p in student.trainable().items()}
    report = calibrate_reconstruct(student, teacher, x, 40, after_blur=False)
    blurred = [r["node"] for r in report if r["node"] in nodes and reads_blurred(nodes[r["node"]].inputs[0])]
    assert len(blurred) == 2
    assert [r["node"] for r in report if not r["refit"]] == blurred
    for name in blurred:
        weight = nodes[name].inputs[1].name
        after = student.trainable()[weight].detach()
        assert factor_spread(after, before[weight]) < 1e-4
        assert float((after / before[weight] - 1).abs().max()) > 1e-3
    default = OnnxModule(aa_deploy.common.model_io.load(tmp_path / "r20.aa.onnx")).eval()
    assert all(r["refit"] for r in calibrate_reconstruct(default, teacher, x, 40))


@pytest.mark.parametrize("f", [2, 4])
def test_a_dense_teachers_map_is_averaged_over_its_phases_onto_the_students_grid(f):
    """`onto_grid` against NumPy: a dense map whose f x f sampling phases each hold their own random map;
    at every interior position of the student's grid the result is the triangle-weighted sum of the
    phases' neighbours, every phase weighted 1/f^2 in all (a map constant per phase gives their mean)."""
    from aa_deploy.calibration.reconstruct import onto_grid

    rng = np.random.default_rng(0)
    h, w = 5, 6
    phases = rng.standard_normal((f, f, 2, 3, h, w)).astype(np.float32)  # (phase y, phase x, N, C, H, W)
    dense = np.zeros((2, 3, f * h, f * w), np.float32)
    for a in range(f):
        for b in range(f):
            dense[:, :, a::f, b::f] = phases[a, b]
    got = onto_grid(torch.from_numpy(dense), (h, w)).numpy()
    assert got.shape == (2, 3, h, w)
    taps = {d: (f - abs(d)) / f**2 for d in range(-(f - 1), f)}
    for i in range(1, h - 1):
        for j in range(1, w - 1):
            want = sum(
                ty * tx * dense[:, :, i * f + dy, j * f + dx] for dy, ty in taps.items() for dx, tx in taps.items()
            )
            np.testing.assert_allclose(got[:, :, i, j], want, atol=1e-5)
    constant = np.zeros_like(dense)
    for a in range(f):
        for b in range(f):
            constant[:, :, a::f, b::f] = a * f + b
    np.testing.assert_allclose(onto_grid(torch.from_numpy(constant), (h, w)).numpy(), (f * f - 1) / 2, atol=1e-5)


def test_onto_grid_keeps_a_map_of_the_students_size_and_refuses_one_of_another_model():
    from aa_deploy.calibration.reconstruct import onto_grid
    from aa_deploy.common.errors import InputError

    y = torch.randn(1, 2, 7, 7)
    assert onto_grid(y, (7, 7)) is y
    with pytest.raises(InputError, match="conversion of this teacher"):
        onto_grid(torch.randn(1, 2, 10, 10), (7, 7))


def test_reconstruct_towards_a_dense_teacher_fits_its_phase_averaged_output(tmp_path):
    """The blurred ResNet-20 refit against the dense-2 conversion of its original (`convert --dense-last 2`,
    whose maps after the last two levels are larger than the student's): every conv is refit and the
    student's outputs end closer to that teacher's than the plain conversion's were."""
    plain = export(bundled.resnet20(), tmp_path / "r20.onnx", (2, 3, 32, 32))
    aa_deploy.convert(plain, tmp_path / "r20.aa.onnx", aa_deploy.Options())
    aa_deploy.convert(plain, tmp_path / "r20.d2.onnx", aa_deploy.Options(filter="none", dense_last=2))
    images = torch.from_numpy(bundled.cifar_normalize(bundled.cifar_test_images()[0]))
    fit, check = images[:60], images[60:]
    teacher = OnnxModule(aa_deploy.common.model_io.load(tmp_path / "r20.d2.onnx")).eval()
    student = OnnxModule(aa_deploy.common.model_io.load(tmp_path / "r20.aa.onnx")).eval()
    with torch.no_grad():
        target = teacher(check)
        before = (student(check) - target).square().mean()
        report = calibrate_reconstruct(student, teacher, fit, 60)
        after = (student(check) - target).square().mean()
    assert sum(r["refit"] for r in report) >= 19  # the convs and the classifier
    assert after < 0.5 * before
