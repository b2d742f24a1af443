"""Dense sampling on the graphs people export: squeeze-excitation gates, channel shuffles, channels-last
norms, pads computed by constant subgraphs, whole-map pools, old-opset average pools.

The independent reference is the original network run once per combination of sampling phases of
the dense sites, in PyTorch (forward hooks make every strided module of a dense level sample at
offset (a, b) instead of (0, 0): its stride-1 output, computed with its own padding and zeros beyond
the map, taken at a::s, b::s), or, for a model that exists only as ONNX, in ONNX Runtime (each dense
site at stride 1 followed by a Slice at that offset). The dense graph equals the mean over the phases
of the pooled features, carried through the head (the head of the graph sees the mean).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aa_deploy
from aa_deploy.common import model_io
from aa_deploy.converters.export import export, load_model
from aa_deploy.verification.parity import Inputs, verify
from tests.helpers import cli

TOL = 1e-4  # of the output scale
LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def _ort(path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _ort_each(path, x: np.ndarray) -> np.ndarray:
    return np.concatenate([_ort(path, x[i : i + 1]) for i in range(len(x))])


# --- the PyTorch reference: every strided module of the dense levels sampled at an offset -------------


def _strided(module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d):
        stride = tuple(module.stride) if isinstance(module.stride, tuple | list) else (module.stride, module.stride)
        return stride[0] if stride[0] > 1 else 0
    return 0


def _dense_modules(model: nn.Module, x: torch.Tensor, levels: int) -> list[list[nn.Module]]:
    """The strided modules of the last `levels` resolution levels, grouped by level (finest first)."""
    sizes: dict[nn.Module, int] = {}

    def record(module, inputs, out) -> None:
        sizes.setdefault(module, inputs[0].shape[2])

    hooks = [m.register_forward_hook(record) for m in model.modules() if _strided(m)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    chosen = sorted(set(sizes.values()))[:levels]
    return [[m for m, s in sizes.items() if s == size] for size in sorted(chosen, reverse=True)]


def _phase_hook(a: int, b: int):
    def hook(module, inputs, out):
        x, s = inputs[0], _strided(module)
        if isinstance(module, nn.Conv2d):
            if type(module).__name__ == "Conv2dSame":  # timm's TF "same" padding, computed in forward
                from timm.layers.padding import pad_same

                x = pad_same(x, module.kernel_size, module.stride, module.dilation)
                p = (0, 0)
            elif hasattr(module, "static_padding"):  # EfficientNet-Lite's convs pad inside their forward
                x, p = module.static_padding(x), module.padding
            else:
                p = module.padding
            full = F.conv2d(
                F.pad(x, (p[1], p[1] + s, p[0], p[0] + s)),
                module.weight,
                module.bias,
                1,
                0,
                module.dilation,
                module.groups,
            )
        elif isinstance(module, nn.MaxPool2d):
            p = module.padding if isinstance(module.padding, int) else module.padding[0]
            full = F.max_pool2d(
                F.pad(x, (p, p + s, p, p + s), value=float("-inf")), module.kernel_size, 1, 0, module.dilation
            )
        elif isinstance(module, nn.AvgPool2d) and not module.padding:  # the far border zero-filled, counted
            full = F.avg_pool2d(F.pad(x, (0, s, 0, s)), module.kernel_size, 1, 0)
        else:
            raise AssertionError(f"no phase hook for {type(module).__name__}")
        return full[:, :, a::s, b::s][:, :, : out.shape[2], : out.shape[3]]

    return hook


def _kept(stride: int, phases: str) -> list[tuple[int, int]]:
    """The sampling phases of one level: every one, or the diagonal ones."""
    return list(itertools.product(range(stride), repeat=2)) if phases == "all" else [(p, p) for p in range(stride)]


def _phase_mean(model: nn.Module, x: torch.Tensor, levels: list[list[nn.Module]], phases: str = "all") -> np.ndarray:
    """The mean over every kept phase combination of the pooled features, carried through the head (timm's
    forward_features / forward_head; else the logits, for a head that is affine after its pool)."""
    split = hasattr(model, "forward_features") and hasattr(model, "forward_head")
    outs = []
    per_level = [_kept(_strided(ms[0]), phases) for ms in levels]
    for phases in itertools.product(*per_level):
        hooks = [m.register_forward_hook(_phase_hook(a, b)) for ms, (a, b) in zip(levels, phases) for m in ms]
        try:
            with torch.no_grad():
                outs.append(model.forward_features(x).mean((2, 3), keepdim=True) if split else model(x))
        finally:
            for h in hooks:
                h.remove()
    mean = torch.stack(outs).mean(0)
    with torch.no_grad():
        return (model.forward_head(mean) if split else mean).numpy()


def _check_exact(
    model: nn.Module, path: Path, levels: int, x: np.ndarray, batch_one: bool = False, phases: str = "all"
) -> None:
    groups = _dense_modules(model, torch.from_numpy(x[:1]), levels)
    ref = _phase_mean(model, torch.from_numpy(x), groups, phases)
    got = _ort_each(path, x) if batch_one else _ort(path, x)
    scale = np.abs(ref).max()
    error = np.abs(got - ref).max()
    assert error <= TOL * scale, (error, scale)
    with torch.no_grad():
        original = model(torch.from_numpy(x)).numpy()
    # the phases differ: the graph is far closer to the phase mean than to the original
    assert np.abs(got - original).max() > 10 * max(error, 1e-7 * scale)


def _images(size: int, n: int = 2) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, 3, size, size)).astype(np.float32)


# --- timm / torchvision architectures, exported as users export them --------------------------------

ZOO = [
    ("timm:tf_efficientnet_b0", "dynamo", "squeeze-excitation, TF-same pads"),
    ("timm:mobilenetv3_small_050", "dynamo", "squeeze-excitation with hard sigmoid, a head after the pool"),
    ("timm:regnety_002", "dynamo", "squeeze-excitation, strided shortcut convs"),
    ("torchvision:shufflenet_v2_x0_5", "dynamo", "channel shuffle Reshapes"),
    ("timm:convnextv2_atto", "dynamo", "channels-last LayerNorm, global response norm"),
    ("timm:convnext_atto", "torchscript", "channels-last LayerNorm, opset 13"),
]


@pytest.mark.zoo
@pytest.mark.parametrize("spec, exporter, what", ZOO, ids=[z[0].split(":")[1] for z in ZOO])
def test_zoo_dense_is_the_mean_over_the_sampling_phases(tmp_path, spec, exporter, what):
    model, _ = load_model(spec)
    size = 64
    path = tmp_path / "m.onnx"
    if exporter == "dynamo":
        export(model, path, (2, 3, size, size))
    else:
        torch.onnx.export(model, torch.zeros(1, 3, size, size), path, dynamo=False, opset_version=13)
    x = _images(size)
    for levels in (1, 2):
        out = tmp_path / f"d{levels}.onnx"
        result = aa_deploy.convert(path, out, aa_deploy.Options(filter="none", dense_last=levels))
        assert {a.action for a in result.actions} >= {"dense"}
        onnx.checker.check_model(str(out))
        _check_exact(model, out, levels, x, batch_one=exporter == "torchscript")
        # the twin (dilated modules, pools split by phase inside the dense levels) agrees with the graph
        report = verify(out, spec, Inputs(count=2))
        assert report.passed, report.as_dict()["outputs"]
    # the diagonal phases of both levels, stacked on the batch axis: their exact mean
    out = tmp_path / "d2.diagonal.onnx"
    aa_deploy.convert(path, out, aa_deploy.Options(filter="none", dense_last=2, phases="diagonal"))
    onnx.checker.check_model(str(out))
    _check_exact(model, out, 2, x, batch_one=exporter == "torchscript", phases="diagonal")


@pytest.mark.zoo
def test_quantize_and_fp16_take_pools_split_by_phase(tmp_path):
    """INT8 Q/DQ and the float16 graph a TensorRT build starts from, on a dense squeeze-excitation net:
    both run in ONNX Runtime and keep the float32 graph's answers."""
    from PIL import Image

    from aa_deploy.converters.precision import to_fp16

    model, _ = load_model("timm:mobilenetv3_small_050")
    path = export(model, tmp_path / "m.onnx", (1, 3, 64, 64))
    dense = tmp_path / "d2.onnx"
    aa_deploy.convert(path, dense, aa_deploy.Options(filter="none", dense_last=2))
    to_fp16(dense, tmp_path / "d2.fp16.onnx")
    x = _images(64, 1)
    want = _ort(dense, x)
    half = _ort(tmp_path / "d2.fp16.onnx", x)
    assert np.abs(half - want).max() <= 1e-2 * np.abs(want).max()
    images = tmp_path / "calib"
    images.mkdir()
    rng = np.random.default_rng(1)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(images / f"{i}.png")
    proc = cli("quantize", dense, "--calib-images", images, "--size", "64", "-o", tmp_path / "int8.onnx")
    assert proc.returncode == 0, proc.stderr
    assert _ort(tmp_path / "int8.onnx", x).shape == want.shape


@pytest.mark.zoo
def test_squeeze_excitation_is_split_by_phase_and_recorded(tmp_path):
    """Each whole-map pool that gates the map is split by phase (Reshape -> Reduce -> Reshape, its gate
    tiled back): the metadata counts them; the head's pool stays one pool over every phase."""
    model, _ = load_model("timm:mobilenetv3_small_050")
    path = export(model, tmp_path / "m.onnx", (1, 3, 64, 64))
    out = tmp_path / "d1.onnx"
    aa_deploy.convert(path, out, aa_deploy.Options(filter="none", dense_last=1))
    dense = model_io.read_metadata(ir.load(out))["dense"]
    sizes: list[int] = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: sizes.append(i[0].shape[2]) and None)
        for m in model.modules()
        if type(m).__name__ == "SqueezeExcite"
    ]
    with torch.no_grad():
        model(torch.zeros(1, 3, 64, 64))
    for h in hooks:
        h.remove()
    se_last_level = sizes.count(min(sizes))  # the gates after the last level's strided conv
    assert dense["per_phase_pools"] >= se_last_level > 0
    ops = [n.op_type for n in ir.load(out).graph]
    assert ops.count("Tile") == dense["per_phase_pools"]


# --- graphs that need folding, whole-map pools, old opsets ------------------------------------------


@pytest.fixture(scope="module")
def lite0_torchscript(tmp_path_factory):
    """The trained EfficientNet-Lite0, TorchScript exporter, opset 17, dynamic batch: its TF-"same" pads
    are computed by constant subgraphs."""
    model, _ = load_model("aa:efficientnet_lite0")
    path = tmp_path_factory.mktemp("lite0ts") / "lite0.ts.onnx"
    torch.onnx.export(
        model,
        torch.zeros(1, 3, 224, 224),
        path,
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    return model, path


def test_pads_computed_by_constant_subgraphs_are_folded(lite0_torchscript, tmp_path):
    model, path = lite0_torchscript
    x = _images(224, 2)
    for levels in (1, 2):
        out = tmp_path / f"d{levels}.onnx"
        aa_deploy.convert(path, out, aa_deploy.Options(filter="none", dense_last=levels))
        converted = ir.load(out)
        assert model_io.read_metadata(converted)["dense"]["folded_nodes"] > 0
        assert "ConstantOfShape" not in {n.op_type for n in converted.graph}
        assert [v.name for v in converted.graph.inputs] == ["input"]  # the user's names stay
        _check_exact(model, out, levels, x)  # a dynamic batch: two images at once


def test_multiply_adds_of_the_torchscript_export_equal_the_dynamo_export(lite0_torchscript, tmp_path):
    """Every node counts (pads folded on a copy, the Gemm after a run-time Flatten counted per sample):
    both exports of one network cost the same, converted or not."""
    from aa_deploy.conversion.graph_pass import plan_cost

    model, path = lite0_torchscript
    dynamo = export(model, tmp_path / "lite0.onnx", (1, 3, 224, 224))
    for options in (aa_deploy.Options(filter="none", dense_last=2), aa_deploy.Options()):
        ts, dyn = plan_cost(model_io.load(path), options), plan_cost(model_io.load(dynamo), options)
        assert ts.unknown == dyn.unknown == 0
        assert (ts.original, ts.converted) == (dyn.original, dyn.converted)


def test_the_blur_path_does_not_fold(lite0_torchscript, tmp_path):
    _, path = lite0_torchscript
    aa_deploy.convert(path, tmp_path / "b.onnx", aa_deploy.Options())
    converted = ir.load(tmp_path / "b.onnx")
    assert "ConstantOfShape" in {n.op_type for n in converted.graph}
    assert "dense" not in model_io.read_metadata(converted)


@pytest.mark.parametrize("written", ["functional", "module"])
def test_a_whole_map_average_pool_is_a_global_pool(tmp_path, written):
    """A CIFAR ResNet exported with `avg_pool2d(x, 8)` or an `nn.AvgPool2d(8)` (TorchScript, opset 11,
    batch 1): the pool's kernel covers the 8x8 map, so it is the global pool."""
    from tests.conversion.test_dense import resnet_phase_reference

    resnet, _ = load_model("aa:cifar10_resnet20")

    class Pooled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = resnet
            self.pool = nn.AvgPool2d(8) if written == "module" else (lambda x: F.avg_pool2d(x, 8))

        def forward(self, x):
            m = self.m
            x = m.layer3(m.layer2(m.layer1(F.relu(m.bn1(m.conv1(x))))))
            return m.linear(torch.flatten(self.pool(x), 1))

    model = Pooled().eval()
    path = tmp_path / "r20.onnx"
    torch.onnx.export(model, torch.zeros(1, 3, 32, 32), path, dynamo=False, opset_version=11)
    assert "AveragePool" in {n.op_type for n in ir.load(path).graph}
    x = _images(32, 3)
    for levels in (1, 2):
        out = tmp_path / f"d{levels}.onnx"
        aa_deploy.convert(path, out, aa_deploy.Options(filter="none", dense_last=levels))
        assert "GlobalAveragePool" in {n.op_type for n in ir.load(out).graph}
        ref = resnet_phase_reference(model, resnet, x, levels)
        got = _ort_each(out, x)
        assert np.abs(got - ref).max() <= TOL * np.abs(ref).max()
        # the twin keeps the functional whole-map pool global on the dense map, as the graph does
        report = verify(out, model, Inputs(count=2))
        assert report.passed, report.as_dict()["outputs"]


# --- the ONNX Model Zoo DenseNet-121 (opset 9): no PyTorch original, so the reference is ONNX Runtime --


def _phase_graph(path: Path, out: Path, sites: list[str], phases: list[tuple[int, int]]) -> Path:
    """The original graph with each named site at stride 1 (far pads extended by its stride) and then
    sampled at its phase by a Slice: the original computed at those sampling phases."""
    model = onnx.load(str(path))
    model = onnx.version_converter.convert_version(model, 11)
    g = model.graph
    del g.value_info[:]  # the declared shapes are the original's
    for name, (a, b) in zip(sites, phases):
        (i, node) = next((i, n) for i, n in enumerate(g.node) if n.name == name)
        attrs = {x.name: x for x in node.attribute}
        s = list(attrs["strides"].ints)
        pads = list(attrs["pads"].ints) if "pads" in attrs else [0, 0, 0, 0]
        pads[2] += s[0] - 1  # enough for the last window of every phase (a pad may not reach a kernel's size)
        pads[3] += s[1] - 1
        del node.attribute[:]
        node.attribute.extend(
            [x for k, x in attrs.items() if k not in ("strides", "pads", "count_include_pad")]
            + [onnx.helper.make_attribute("strides", [1, 1]), onnx.helper.make_attribute("pads", pads)]
            # the far border zero-filled: what lies beyond the map counts as zeros
            + [onnx.helper.make_attribute("count_include_pad", 1)] * (node.op_type == "AveragePool")
        )
        full = node.output[0] + "_stride1"
        reader = node.output[0]
        node.output[0] = full
        consts = [
            onnx.helper.make_node(
                "Constant", [], [f"{full}_{k}"], value=onnx.numpy_helper.from_array(np.array(v, np.int64))
            )
            for k, v in (("starts", [a, b]), ("ends", [10**6, 10**6]), ("axes", [2, 3]), ("steps", s))
        ]
        sl = onnx.helper.make_node(
            "Slice", [full] + [f"{full}_{k}" for k in ("starts", "ends", "axes", "steps")], [reader]
        )
        for offset, n in enumerate([*consts, sl]):
            g.node.insert(i + 1 + offset, n)
    onnx.save(model, str(out))
    return out


def _phase_mean_onnx(path: Path, tmp: Path, sites: list[str], x: np.ndarray) -> np.ndarray:
    outs = []
    for k, phases in enumerate(itertools.product(itertools.product(range(2), repeat=2), repeat=len(sites))):
        ref = _phase_graph(path, tmp / f"phase{k}.onnx", sites, list(phases))
        outs.append(_ort(ref, x))
        ref.unlink()
    return np.mean(outs, axis=0)


@pytest.mark.parametrize("levels", [1, 2])
def test_zoo_densenet_at_opset_9(tmp_path, levels):
    """Transitions are AveragePools; dense-2 dilates the last one, which needs opset 19 as an AveragePool
    and is written as a depthwise Conv with its taps instead: the graph stays at its opset and valid."""
    path = LIGHT / "light_densenet121.onnx"
    out = tmp_path / "d.onnx"
    result = aa_deploy.convert(path, out, aa_deploy.Options(filter="none", dense_last=levels))
    onnx.checker.check_model(str(out))
    sites = [a.site.name for a in result.actions if a.action == "dense"]
    assert len(sites) == levels
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    ref = _phase_mean_onnx(path, tmp_path, sites, x)
    got = _ort(out, x)
    assert np.abs(got - ref).max() <= TOL * np.abs(ref).max()
    converted = onnx.load(str(out))
    if levels == 2:
        assert all(
            not (n.op_type == "AveragePool" and any(a.name == "dilations" for a in n.attribute))
            for n in converted.graph.node
        )
        assert max(i.version for i in converted.opset_import if i.domain in ("", "ai.onnx")) < 19


# --- what convert says after a dense conversion ------------------------------------------------------


def test_convert_says_what_dense_sampling_does(tmp_path):
    path = export(load_model("aa:cifar10_resnet20")[0], tmp_path / "r20.onnx", (1, 3, 32, 32))
    proc = cli("convert", path, "--dense-last", "2", "--filter", "none", "-o", tmp_path / "d.onnx")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout + proc.stderr
    assert "calibrate it" not in text
    assert "averaged over" in text and "consistency" in text and "--require" in text, text


def test_each_rule_answers_accept_rewrite_or_refuse_with_its_reason():
    """The rules are values, not side effects: called on one node each, they return a verdict, and a
    check deep inside a rule (a static shape) comes back as a refusal rather than an exception."""
    from aa_deploy.conversion import dense

    g = ir.Graph([], [], nodes=[], opset_imports={"": 17})
    walk = dense._Walk(g, frozenset())
    m = dense.Map((2, 3), (2, 2), (4, 4))

    def value(name, dims):
        return ir.Value(
            name=name, shape=None if dims is None else ir.Shape(dims), type=ir.TensorType(ir.DataType.FLOAT)
        )

    x = value("x", [1, 8, 8, 8])

    def ints(**kw):
        return [ir.AttrInt64s(k, v) for k, v in kw.items()]

    relu = ir.Node("", "Relu", [x], name="relu")
    verdict = dense.RULES["Relu"](walk, relu, [m])
    assert (verdict.kind, verdict.map, verdict.edits) == ("accept", m, ())

    conv = ir.Node("", "Conv", [x, value("w", [8, 8, 3, 3])], attributes=ints(kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
    verdict = dense.RULES["Conv"](walk, conv, [m, None])
    assert verdict.kind == "rewrite" and verdict.map == m
    (edit,) = verdict.edits
    assert edit.node is conv and edit.attributes == {"pads": [2, 2, 2, 2], "strides": [1, 1], "dilations": [2, 2]}

    pool = ir.Node("", "GlobalAveragePool", [x])
    verdict = dense.RULES["GlobalAveragePool"](walk, pool, [m])
    assert (verdict.kind, verdict.map, verdict.head) == ("accept", None, True)  # the head: it averages the phases

    reflect = ir.Node("", "Pad", [x, value("pads", [8])], attributes=[ir.AttrString("mode", "reflect")])
    verdict = dense.RULES["Pad"](walk, reflect, [m, None])
    assert verdict.kind == "refuse" and "reflection" in verdict.why and verdict.map is None

    unknown = ir.Node("", "Add", [x, value("y", None)], name="add")
    verdict = dense.RULES["Add"](walk, unknown, [m, None])
    assert (verdict.kind, verdict.why) == ("refuse", "has an input of unknown rank: dense sampling needs static shapes")

    strided = ir.Node("", "MaxPool", [x], attributes=ints(kernel_shape=[2, 2], strides=[2, 2]))
    assert "larger N" in dense.RULES["MaxPool"](walk, strided, [m]).why
    assert dense.RULES["InstanceNormalization"](walk, relu, [m]).why == dense.WHOLE_MAP_NORM
