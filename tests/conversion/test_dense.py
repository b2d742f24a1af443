"""Dense sampling (`convert --dense-last N`) on trained networks, exported the ways users export them.

The independent reference is the original PyTorch network run once per sampling phase of the dense
sites: a forward hook makes each dense site sample at offset (a, b) instead of (0, 0) (its stride-1
output, computed here with its own padding and zeros beyond the map, taken at a::s, b::s), and the
rest of the network runs unchanged. The dense graph must equal the mean of those runs' logits (the
head is affine after the global pool, so the mean of the pooled features carries through).
"""

from __future__ import annotations

import itertools

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aa_deploy
from aa_deploy.common import bundled, model_io
from aa_deploy.common.errors import InputError
from aa_deploy.common.input_format import InputFormat
from aa_deploy.conversion import cost
from aa_deploy.converters.export import export
from aa_deploy.verification.parity import Inputs, verify
from tests.helpers import cli

TOL = 1e-4  # of the output scale


def _ort(path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _strided_conv_phase(conv: nn.Conv2d, x: torch.Tensor, a: int, b: int, rows: int, cols: int, pad) -> torch.Tensor:
    """`conv`'s output sampled at offset (a, b): its stride-1 map (padding `pad` = left, right, top,
    bottom, then zeros beyond the map) at rows a::s, cols b::s."""
    s = conv.stride[0]
    full = F.conv2d(F.pad(x, (pad[0], pad[1] + s, pad[2], pad[3] + s)), conv.weight, conv.bias, 1, 0, 1, conv.groups)
    return full[:, :, a::s, b::s][:, :, :rows, :cols]


def _resnet_block_hooks(block, a: int, b: int) -> list:
    """Hooks making a CIFAR ResNet's downsampling block sample at (a, b): its strided conv and its
    option-A shortcut (every second pixel, channels zero-padded) alike."""

    def conv_hook(module, inputs, out):
        p = module.padding[0]
        return _strided_conv_phase(module, inputs[0], a, b, out.shape[2], out.shape[3], (p, p, p, p))

    def shortcut_hook(module, inputs, out):
        x = inputs[0][:, :, a :: module.stride, b :: module.stride]
        return F.pad(x, (0, 0, 0, 0, module.pad_channels, module.pad_channels))

    return [block.conv1.register_forward_hook(conv_hook), block.shortcut.register_forward_hook(shortcut_hook)]


def _phase_mean(model: nn.Module, x: torch.Tensor, sites: list, kept: str = "all") -> np.ndarray:
    """Mean logits over every combination of the kept sampling phases of `sites` (functions (a, b) ->
    hooks): all four per site, or the diagonal two."""
    per_site = list(itertools.product(range(2), range(2))) if kept == "all" else [(0, 0), (1, 1)]
    outs = []
    for phases in itertools.product(*[per_site for _ in sites]):
        hooks = [h for site, (a, b) in zip(sites, phases) for h in site(a, b)]
        try:
            with torch.no_grad():
                outs.append(model(x).numpy())
        finally:
            for h in hooks:
                h.remove()
    return np.mean(outs, axis=0)


def resnet_phase_reference(
    model: nn.Module, resnet: nn.Module, x: np.ndarray, levels: int, kept: str = "all"
) -> np.ndarray:
    """`model` (a CIFAR ResNet, or a network around one) averaged over the (kept) phases of `resnet`'s
    last `levels` downsampling blocks, image by image."""
    blocks = [resnet.layer3[0]] if levels == 1 else [resnet.layer2[0], resnet.layer3[0]]
    return np.concatenate(
        [
            _phase_mean(
                model,
                torch.from_numpy(x[i : i + 1]),
                [lambda a, b, blk=blk: _resnet_block_hooks(blk, a, b) for blk in blocks],
                kept,
            )
            for i in range(len(x))
        ]
    )


@pytest.fixture(scope="module")
def resnet20(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dense")
    model = bundled.resnet20()
    dynamo = export(model, folder / "r20.onnx", (2, 3, 32, 32))
    torchscript = folder / "r20.ts.onnx"  # TorchScript exporter, fixed batch 1, opset 11
    torch.onnx.export(model, torch.zeros(1, 3, 32, 32), torchscript, dynamo=False, opset_version=11)
    return model, {"dynamo": dynamo, "torchscript": torchscript}, folder


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("levels", [1, 2])
@pytest.mark.parametrize("phases", ["all", "diagonal"])
def test_resnet20_dense_is_the_mean_over_the_sampling_phases(resnet20, exporter, levels, phases):
    """Every phase (a denser map), or the diagonal ones (stacked on the batch axis): the mean of the
    original over them, strided-slice shortcuts included."""
    model, files, folder = resnet20
    out = folder / f"r20.{exporter}.d{levels}.{phases}.onnx"
    options = aa_deploy.Options(filter="none", dense_last=levels, phases=phases)
    result = aa_deploy.convert(files[exporter], out, options)
    dense = [a for a in result.actions if a.action == "dense"]
    assert len(dense) == 2 * levels  # each level: the strided conv and the strided-slice shortcut
    images = bundled.cifar_feed(InputFormat())(bundled.cifar_test_images()[0][:8])
    x = images[:1] if exporter == "torchscript" else images
    ref = resnet_phase_reference(model, model, x, levels, phases)
    got = np.concatenate([_ort(out, x[i : i + 1]) for i in range(len(x))])
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() <= TOL * scale
    with torch.no_grad():
        original = model(torch.from_numpy(x)).numpy()
    assert np.abs(got - original).max() > 100 * TOL * scale  # the phases differ: this is not the original


def test_twin_of_a_dense_model_passes_verify(resnet20):
    """The twin (PyTorch, dilated modules) and the graph (ONNX Runtime) agree: blurs at the first
    level, dense at the last, and two dense levels without blurs."""
    _, files, folder = resnet20
    for name, options in (
        ("blur-dense", aa_deploy.Options(filter="triangle", dense_last=1)),
        ("dense2", aa_deploy.Options(filter="none", dense_last=2)),
    ):
        out = folder / f"r20.{name}.onnx"
        result = aa_deploy.convert(files["dynamo"], out, options)
        assert {a.action for a in result.actions} == ({"pre", "dense"} if name == "blur-dense" else {"dense"})
        report = verify(out, "aa:cifar10_resnet20", Inputs("bundled:cifar10", count=32))
        assert report.passed, report.as_dict()


def test_inspect_states_the_cost_and_convert_says_dense(resnet20):
    _, files, folder = resnet20
    proc = cli("inspect", files["dynamo"], "--dense-last", "1", "--filter", "none")
    assert proc.returncode == 0, proc.stderr
    assert "dense" in proc.stdout and "multiply-adds" in proc.stdout
    # stage 3 (a third of the convs, 8x8 -> 16x16 positions) runs at 4x: about twice the original
    ratio = float(proc.stdout.rsplit("(x", 1)[1].split(")")[0])
    assert 1.7 < ratio < 2.2
    proc = cli("convert", files["dynamo"], "--dense-last", "1", "--filter", "none", "-o", folder / "c.onnx", "-q")
    assert proc.returncode == 0 and "1 dense" not in proc.stdout and "2 dense" in proc.stdout, proc.stdout


def test_diagonal_phases_cost_half_and_are_recorded(resnet20):
    """The diagonal phases of both levels: 4 of 16 combinations, so well under half dense-2's added
    multiply-adds; the file says what it keeps; the twin, which computes every phase, refuses it in one
    line, and --phases without --dense-last is refused before anything is read."""
    _, files, folder = resnet20
    costs = {}
    for phases in ("all", "diagonal"):
        proc = cli("inspect", files["dynamo"], "--dense-last", "2", "--filter", "none", "--phases", phases)
        assert proc.returncode == 0, proc.stderr
        costs[phases] = float(proc.stdout.rsplit("(x", 1)[1].split(")")[0])
    # every level's map: a quarter of the positions of the one before; the diagonal runs each level's convs
    # at 2 and 4 phases where all phases run them at 4 and 16
    assert 6.0 < costs["all"] < 7.5 and 2.0 < costs["diagonal"] < 2.6, costs
    out = folder / "r20.d2.diag.onnx"
    proc = cli("convert", files["dynamo"], "--dense-last", "2", "--filter", "none", "--phases", "diagonal", "-o", out)
    assert proc.returncode == 0 and "diagonal sampling phases of 4 sites" in proc.stdout, proc.stdout
    # counted on the written file as consistency and the frontier count it: the stacked batch included
    counted = [
        cost.multiply_adds(cost.with_shapes(cost.batch_of_one(model_io.load(p))))[0] for p in (files["dynamo"], out)
    ]
    assert abs(counted[1] / counted[0] - costs["diagonal"]) < 0.01, (counted, costs)
    record = model_io.read_metadata(model_io.load(out))
    assert record["options"]["phases"] == "diagonal" and record["phases"] == {"kept": "diagonal", "combinations": 4}
    proc = cli("verify", out, "--reference", "aa:cifar10_resnet20")
    assert proc.returncode == 2 and "--phases diagonal: the twin computes every phase" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = cli("convert", files["dynamo"], "--phases", "diagonal", "-o", folder / "never.onnx")
    assert proc.returncode == 2 and "give --dense-last N" in proc.stderr and not (folder / "never.onnx").exists()


# --- graphs dense sampling cannot make exact: refused in one line ---------------------------------


class _SE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.down = nn.Conv2d(8, 8, 3, 2, 1)
        self.gate = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.down(torch.relu(self.stem(x))))
        y = y * torch.sigmoid(self.gate(y.mean((2, 3), keepdim=True)))  # squeeze-excitation
        return self.head(y.mean((2, 3)))


class _LinearSE(nn.Module):
    """A squeeze-excitation whose gate is a Linear on the flattened pool: the pool keeps no spatial axes,
    so it cannot be split by phase."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.down = nn.Conv2d(8, 8, 3, 2, 1)
        self.gate = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.down(torch.relu(self.stem(x))))
        y = y * torch.sigmoid(self.gate(y.mean((2, 3)))).view(-1, 8, 1, 1)
        return self.head(y.mean((2, 3)))


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("levels", [1, 2])
def test_squeeze_excitation_is_exact_per_phase(tmp_path, exporter, levels):
    """The gate pools each sampling phase on its own and gates that phase: the dense graph is the mean
    over the phases of the original, SE included; with two levels the last map holds 16 phases."""
    torch.manual_seed(0)
    model = _SE().eval()
    path = tmp_path / "se.onnx"
    if exporter == "dynamo":
        export(model, path, (1, 3, 16, 16))
    else:
        torch.onnx.export(model, torch.zeros(1, 3, 16, 16), path, dynamo=False, opset_version=13)
    out = tmp_path / "d.onnx"
    aa_deploy.convert(path, out, aa_deploy.Options(filter="none", dense_last=levels))

    def hooks(conv):
        def site(a, b):
            def hook(module, inputs, o):
                return _strided_conv_phase(module, inputs[0], a, b, o.shape[2], o.shape[3], (1, 1, 1, 1))

            return [conv.register_forward_hook(hook)]

        return site

    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    sites = [hooks(model.down)] if levels == 1 else [hooks(model.stem), hooks(model.down)]
    ref = _phase_mean(model, torch.from_numpy(x), sites)
    got = _ort(out, x)
    assert np.abs(got - ref).max() <= TOL * np.abs(ref).max()
    with torch.no_grad():
        assert np.abs(got - model(torch.from_numpy(x)).numpy()).max() > 100 * TOL * np.abs(ref).max()


class _FlattenHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 4, 3, 2, 1)
        self.head = nn.Linear(4 * 8 * 8, 4)

    def forward(self, x):
        return self.head(torch.flatten(torch.relu(self.down(x)), 1))


class _DenseOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 4, 3, 2, 1)
        self.conv = nn.Conv2d(4, 2, 3, 1, 1)

    def forward(self, x):
        return self.conv(torch.relu(self.down(x)))


@pytest.mark.parametrize(
    "module, words",
    [
        (_LinearSE, "without keeping its axes"),
        (_FlattenHead, "depends on the spatial size"),
        (_DenseOutput, "graph output"),
    ],
)
def test_graphs_that_would_not_be_exact_are_refused_in_one_line(tmp_path, module, words):
    path = tmp_path / "m.onnx"
    torch.onnx.export(module().eval(), torch.zeros(1, 3, 16, 16), path, dynamo=False, opset_version=13)
    with pytest.raises(InputError, match=words):
        aa_deploy.convert(path, tmp_path / "o.onnx", aa_deploy.Options(dense_last=1))
    assert not (tmp_path / "o.onnx").exists()
    for command in (("inspect", path), ("convert", path, "-o", tmp_path / "o.onnx")):
        proc = cli(*command, "--dense-last", "1")
        assert proc.returncode == 2 and words in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "o.onnx").exists()


def test_a_negative_count_is_refused():
    with pytest.raises(ValueError, match="dense-last"):
        aa_deploy.Options(dense_last=-1)


def test_multiply_adds_by_hand(tmp_path):
    """A 3x3 conv 3->8 at stride 2 on 16x16 (8x8 outputs) and a 8->4 linear head: 8*8*8*27 + 8*4."""
    import onnx_ir as ir

    from aa_deploy.conversion import cost

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, 2, 1)
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            return self.head(self.conv(x).mean((2, 3)))

    path = tmp_path / "n.onnx"
    torch.onnx.export(Net().eval(), torch.zeros(1, 3, 16, 16), path, dynamo=False, opset_version=13)
    macs, unknown = cost.multiply_adds(cost.with_shapes(ir.load(path)))
    assert (macs, unknown) == (8 * 8 * 8 * 27 + 8 * 4, 0)


def test_calibrate_and_quantize_take_a_dense_model(resnet20, tmp_path):
    """Blurs at the first level, dense at the last: calibrate refits the layers before the dense sites
    (after them the weights are the original's and the maps denser than the teacher's) and wins back
    agreement with the original on CIFAR images it did not see; the calibrated file passes verify;
    quantize writes an INT8 model of it."""
    from aa_deploy.verification.drift import output_drift
    from tests.helpers import calibrate

    _, files, folder = resnet20
    converted = folder / "r20.blur-dense1.onnx"
    aa_deploy.convert(files["dynamo"], converted, aa_deploy.Options(filter="triangle", dense_last=1))
    from PIL import Image

    crops = tmp_path / "crops"  # unlabeled 32-px crops of the bundled photos, as the demo calibrates on
    crops.mkdir()
    for i, crop in enumerate(bundled.photo_crops(400, 32)):
        Image.fromarray(crop).save(crops / f"{i:04d}.png")
    calibrated = tmp_path / "cal.onnx"
    calibrate(converted, files["dynamo"], crops, calibrated, method="reconstruct")
    # agreement with the original on the 100 bundled CIFAR-10 test images (not calibrated on)
    before = output_drift(files["dynamo"], converted).value
    after = output_drift(files["dynamo"], calibrated).value
    assert after > before + 0.1, (before, after)
    assert verify(calibrated, "aa:cifar10_resnet20", Inputs("bundled:cifar10", count=32)).passed
    proc = cli("quantize", calibrated, "--calib-images", crops, "-o", tmp_path / "int8.onnx")
    assert proc.returncode == 0, proc.stderr


def test_a_diagonal_refusal_comes_before_the_graph_changes():
    """A strided conv at one level, then a Slice tree that subsamples H and W in two steps of 2 (4 in all): the
    diagonal phases refuse the tree in one line, and the conv's level before it is left as it was."""
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    from aa_deploy.conversion.graph_pass import convert_model

    rng = np.random.default_rng(0)
    ints = [numpy_helper.from_array(np.array(v, dtype=np.int64), n) for n, v in
            (("starts", [0, 0]), ("ends", [1 << 30, 1 << 30]), ("axes", [2, 3]), ("steps", [2, 2]))]  # fmt: skip
    weights = [
        numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
        for name, shape in (("w0", (4, 4, 3, 3)), ("w1", (4, 4, 1, 1)))
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], name="down", strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r"], name="relu"),
        helper.make_node("Slice", ["r", "starts", "ends", "axes", "steps"], ["a"], name="first"),
        helper.make_node("Slice", ["a", "starts", "ends", "axes", "steps"], ["b"], name="second"),
        helper.make_node("Conv", ["b", "w1"], ["c"], name="conv"),
        helper.make_node("GlobalAveragePool", ["c"], ["d"], name="pool"),
        helper.make_node("Flatten", ["d"], ["y"], name="flat"),
    ]
    graph = helper.make_graph(
        nodes, "two_levels", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 32, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], ints + weights,
    )  # fmt: skip
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    before = [(n.name, n.op_type) for n in model.graph]
    with pytest.raises(InputError, match="Slice node 'first' subsamples one axis in more than one step"):
        convert_model(model, aa_deploy.Options(filter="none", dense_last=2, phases="diagonal"))
    assert [(n.name, n.op_type) for n in model.graph] == before
