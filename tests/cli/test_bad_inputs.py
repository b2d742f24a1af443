"""A corpus of bad inputs: each gives a one-line error, a non-zero exit, and no output file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from aa_deploy.common.errors import InputError
from tests import graphs as G
from tests.helpers import cli


def _write(path, m: onnx.ModelProto):
    path.write_bytes(m.SerializeToString())
    return path


def _raw(path, data: bytes):
    path.write_bytes(data)
    return path


def bad_models(tmp_path):
    good = G.conv_model([1, 3, 16, 16]).SerializeToString()
    yield "empty file", _raw(tmp_path / "empty.onnx", b"")
    yield "wrong magic", _raw(tmp_path / "png.onnx", b"\x89PNG\r\n\x1a\n" + good[:200])
    yield "truncated", _raw(tmp_path / "cut.onnx", good[: len(good) // 2])
    old = G.conv_model([1, 3, 16, 16])
    old.opset_import[0].version = 9  # upgraded to 11 first, which fails on an op without a schema
    old.graph.node[0].output[0] = "c"
    old.graph.node.append(helper.make_node("NoSuchOp", ["c"], ["Y"]))
    yield "opset upgrade fails", _write(tmp_path / "opset9.onnx", old)
    cyc = onnx.ModelProto()
    cyc.CopyFrom(G.conv_model([1, 3, 16, 16]))
    w = G.const("w2", np.ones((3, 4, 1, 1), np.float32))
    cyc.graph.initializer.append(w)
    # Y = Conv(X, w) reads Z, and Z = Conv(Y, w2): a cycle no topological order can satisfy.
    cyc.graph.node[0].input[0] = "Z"
    cyc.graph.node.append(helper.make_node("Conv", ["Y", "w2"], ["Z"], name="back"))
    yield "cycle", _write(tmp_path / "cycle.onnx", cyc)
    yield "duplicate node names", _write(tmp_path / "dup.onnx", _duplicate_names())
    untyped = G.conv_model([1, 3, 16, 16])
    untyped.graph.output[0].type.tensor_type.ClearField("shape")
    untyped.graph.output[0].type.tensor_type.ClearField("elem_type")
    yield "input fails the checker", _write(tmp_path / "untyped.onnx", untyped)


def _duplicate_names() -> onnx.ModelProto:
    """Two nodes named alike: ONNX Runtime refuses such a model."""
    w = G.const("w", np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32))
    nodes = [
        helper.make_node("Conv", ["X", "w"], ["a"], strides=[2, 2], pads=[1, 1, 1, 1], name="same"),
        helper.make_node("MaxPool", ["a"], ["Y"], kernel_shape=[2, 2], strides=[2, 2], name="same"),
    ]
    graph = helper.make_graph(nodes, "g", [G.inp("X", [1, 3, 16, 16])], [G.out("Y", 4)], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_bad_models_give_one_line_errors_and_no_output(tmp_path):
    for label, path in bad_models(tmp_path):
        out = tmp_path / f"out-{path.stem}.onnx"
        proc = cli("convert", path, "-o", out)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (label, proc.stdout, proc.stderr)
        assert len(lines) == 1 and "Traceback" not in proc.stderr, (label, proc.stderr)
        assert not out.exists(), label
        assert str(path.name) in lines[0] and "converted model" not in lines[0], (label, lines[0])
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".aa-deploy-")], label


@pytest.mark.parametrize("pad", ["reflect", "replicate", "zero"])
def test_one_by_one_feature_maps(tmp_path, pad):
    # A stride-2 conv on a 1x1 map: reflect cannot pad it, so the site falls back to replicate.
    src = _write(tmp_path / "tiny.onnx", G.conv_model([1, 3, 1, 1]))
    proc = cli("convert", src, "--pad", pad, "--blur-stem", "-o", tmp_path / "tiny.aa.onnx")
    assert proc.returncode == 0, proc.stderr
    if pad == "reflect":
        assert "replicate" in proc.stdout
    x = np.random.default_rng(0).standard_normal((1, 3, 1, 1), dtype=np.float32)
    y = ort.InferenceSession(str(tmp_path / "tiny.aa.onnx")).run(None, {"X": x})[0]
    y0 = ort.InferenceSession(str(src)).run(None, {"X": x})[0]
    if pad != "zero":  # a blur of one pixel with reflect/replicate padding is that pixel
        np.testing.assert_allclose(y, y0, rtol=1e-5, atol=1e-6)


def test_onnx_runtime_refusing_inputs_at_run_time_is_one_line(monkeypatch, capsys, tmp_path):
    # A model ONNX Runtime loads but then refuses the inputs of (here: made to refuse): one line on
    # stderr and exit 2, no traceback. Errors that are not ONNX Runtime's still raise.
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

    from aa_deploy.cli import EXIT_INPUT, main
    from aa_deploy.consistency import compare, sides

    def refuse(*args, **kwargs):
        raise InvalidArgument("Got invalid dimensions for input: input\n index: 2 Got: 34 Expected: 32")

    monkeypatch.setattr(sides.Models, "runners", lambda self: {})  # the CLI opens the runners first
    monkeypatch.setattr(sides.Models, "input_format", lambda self: None)
    monkeypatch.setattr(compare, "compare", refuse)
    assert main(["consistency", str(tmp_path / "m.onnx")]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("aa-deploy consistency: error: ONNX Runtime: Got invalid dimensions")

    def bug(*args, **kwargs):  # a fault inside aa-deploy's own code
        from aa_deploy.common import model_io

        model_io.write_metadata(None, {"key": 1})

    monkeypatch.setattr(compare, "compare", bug)
    with pytest.raises(AttributeError):
        main(["consistency", str(tmp_path / "m.onnx")])


def test_another_library_failing_is_one_line_with_a_hint(monkeypatch, capsys, tmp_path):
    # Raised inside a third-party library (here NumPy): one line naming it and asking for a report,
    # exit 2; --debug shows the traceback.
    from aa_deploy.cli import EXIT_INPUT, main
    from aa_deploy.consistency import compare, sides

    def library(*args, **kwargs):
        return np.pad(np.zeros(2), 1, mode="no such mode")  # raised in NumPy's own Python code

    monkeypatch.setattr(sides.Models, "runners", lambda self: {})
    monkeypatch.setattr(sides.Models, "input_format", lambda self: None)
    monkeypatch.setattr(compare, "compare", library)
    assert main(["consistency", str(tmp_path / "m.onnx")]) == EXIT_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("aa-deploy consistency: error: ValueError in numpy"), err
    assert "--debug" in err and "report" in err
    with pytest.raises(ValueError):
        main(["consistency", str(tmp_path / "m.onnx"), "--debug"])


def test_a_model_and_its_external_data_appear_together_or_not_at_all(tmp_path, monkeypatch):
    """Overwriting an output with external data, and failing between the data file and the model: the
    folder holds no model, never the old model beside the new data."""
    import os

    import onnx_ir as ir

    from aa_deploy.common import model_io
    from tests.graphs import conv_model

    path = tmp_path / "m.onnx"
    first, second = (ir.from_proto(conv_model((1, 3, 8, 8), seed=seed)) for seed in (0, 1))
    model_io.save(first, path, external=True)
    assert (tmp_path / "m.onnx.data").exists()
    real = os.replace

    def failing(src, dst):
        if Path(dst) == path and ".old-" not in str(src):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(InputError, match="No space left"):
        model_io.save(second, path, external=True)
    monkeypatch.setattr(os, "replace", real)
    assert not path.exists() and [p.name for p in tmp_path.iterdir()] == ["m.onnx.data"]
    model_io.save(second, path, external=True)  # and a later save makes the pair again
    loaded = onnx.load(str(path))
    want = onnx.numpy_helper.to_array(conv_model((1, 3, 8, 8), seed=1).graph.initializer[0])
    assert np.array_equal(onnx.numpy_helper.to_array(loaded.graph.initializer[0]), want)


def test_no_output_is_written_over_the_external_data_an_input_names(tmp_path):
    """A model whose weights live in `x.onnx.data` (not its own name's data file): writing `x.onnx`
    with external data would replace them, for convert and for calibrate's teacher alike."""
    from aa_deploy.common.atomic import refuse_overwrite

    source = tmp_path / "y.onnx"
    onnx.save(
        G.conv_model((1, 3, 8, 8)), str(source), save_as_external_data=True, location="x.onnx.data", size_threshold=0
    )
    data = tmp_path / "x.onnx.data"
    before = data.read_bytes()
    result = cli("convert", source, "-o", tmp_path / "x.onnx")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "x.onnx.data: output would overwrite the external data of an input" in result.stderr
    with pytest.raises(InputError, match="external data of an input"):
        refuse_overwrite(tmp_path / "x.onnx", tmp_path / "student.onnx", source)
    refuse_overwrite(tmp_path / "z.onnx", source)  # another name writes z.onnx.data: allowed
    assert data.read_bytes() == before and not (tmp_path / "x.onnx").exists()


@pytest.fixture(scope="module")
def r20_and_images(tmp_path_factory):
    """The trained ResNet-20 (TorchScript exporter, fixed batch 1) and a folder of real 32-px PNGs."""
    import torch
    from PIL import Image

    from aa_deploy.common import bundled

    folder = tmp_path_factory.mktemp("writes")
    model = folder / "r20.onnx"
    torch.onnx.export(bundled.resnet20(), torch.zeros(1, 3, 32, 32), model, dynamo=False, opset_version=13)
    images = folder / "images"
    images.mkdir()
    for i, img in enumerate(bundled.cifar_test_images()[0][:8]):
        Image.fromarray(img).save(images / f"{i:02d}.png")
    (folder / "pre.json").write_text('{"size": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}')
    return folder, model, images


@pytest.mark.parametrize(
    "command, target",
    [
        (("consistency", "{model}", "--images", "{images}", "--report"), "{model}"),
        (("consistency", "{model}", "--images", "{images}", "--plot"), "{images}/03.png"),
        (("consistency", "{model}", "--images", "{images}", "--preprocess", "{pre}", "--report"), "{pre}"),
        (("probe", "{model}", "--images", "{images}", "--report"), "{model}"),
        (("verify", "{model}", "--reference", "aa:cifar10_resnet20", "--plain", "--report"), "{model}"),
        (("verify", "{model}", "--reference", "aa:cifar10_resnet20", "--plain", "--junit"), "{model}"),
        (("quantize", "{model}", "--calib-images", "{images}", "-o"), "{images}/04.png"),
        (("calibrate", "{model}", "--teacher", "{model}", "--images", "{images}", "-o"), "{images}/05.png"),
    ],
)
def test_no_written_file_is_an_input(r20_and_images, command, target):
    """Reports, plots, JUnit files and models that would land on a file the command reads (the model,
    its preprocessing file, an image of its folder) are refused in one line before any work, and the
    input is left as it was."""
    folder, model, images = r20_and_images
    fill = {"model": model, "images": images, "pre": folder / "pre.json"}
    args = [str(a).format(**fill) for a in command]
    path = Path(target.format(**fill))
    before = path.read_bytes()
    proc = cli(*args, path)
    assert proc.returncode == 2, proc.stderr
    assert "would overwrite" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert path.read_bytes() == before


def _with_nan(src, dst):
    proto = onnx.load(str(src))
    weight = next(t for t in proto.graph.initializer if onnx.numpy_helper.to_array(t).ndim == 4)
    array = onnx.numpy_helper.to_array(weight).copy()
    array.flat[0] = np.nan
    weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
    onnx.save(proto, str(dst))
    return dst, weight.name


def test_non_finite_weights_and_preprocessing_are_refused(r20_and_images, tmp_path):
    """A NaN weight in the model or the teacher, or a std of 0 in the preprocessing: one line naming it,
    exit 2, nothing written (before: convert said 'outputs close to the original's', calibrate wrote 3
    NaN initializers and reported 100 % fidelity)."""
    folder, model, images = r20_and_images
    nan_model, name = _with_nan(model, tmp_path / "nan.onnx")
    converted = tmp_path / "aa.onnx"
    assert cli("convert", model, "-o", converted, "-q", "--no-drift").returncode == 0
    out = tmp_path / "out.onnx"
    for args in (
        ("convert", nan_model, "-o", out),
        ("calibrate", converted, "--teacher", nan_model, "--images", images, "-o", out, "--method", "stats"),
    ):
        proc = cli(*args)
        assert proc.returncode == 2 and "non-finite" in proc.stderr and name in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists()
    zero = tmp_path / "zero.json"
    zero.write_text('{"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0, 0.2, 0.2]}')
    for args in (
        ("calibrate", converted, "--teacher", model, "--images", images, "-o", out, "--preprocess", zero),
        ("quantize", model, "--calib-images", images, "-o", out, "--preprocess", zero),
    ):
        proc = cli(*args)
        assert proc.returncode == 2 and "std positive" in proc.stderr, proc.stderr
        assert not out.exists()


def test_save_never_writes_a_non_finite_weight(r20_and_images, tmp_path):
    from aa_deploy.common import model_io

    nan_model, name = _with_nan(r20_and_images[1], tmp_path / "nan.onnx")
    with pytest.raises(InputError, match=f"not written: initializer '{name}'"):
        model_io.save(model_io.load(nan_model), tmp_path / "o.onnx", external=False)
    assert not (tmp_path / "o.onnx").exists()


def _named_net(width: int, classes: int):
    """Layers named alike whatever the widths: conv1 (stride 2), conv2, fc."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, width, 3, 2, 1)
            self.conv2 = nn.Conv2d(width, width, 3, 1, 1)
            self.fc = nn.Linear(width, classes)

        def forward(self, x):
            return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)))

    torch.manual_seed(0)
    return Net().eval()


@pytest.mark.parametrize("width, classes", [(16, 10), (8, 12)])
def test_a_teacher_of_other_widths_or_classes_is_refused_in_one_line(r20_and_images, tmp_path, width, classes):
    """Same layer names, other shapes (before: a RuntimeError traceback from stats.py / reconstruct.py)."""
    import torch

    _, _, images = r20_and_images
    student, teacher = tmp_path / "s.onnx", tmp_path / "t.onnx"
    for path, net in ((student, _named_net(8, 10)), (teacher, _named_net(width, classes))):
        torch.onnx.export(net, torch.zeros(1, 3, 32, 32), path, dynamo=False, opset_version=13)
    converted = tmp_path / "s.aa.onnx"
    assert cli("convert", student, "-o", converted, "-q", "--no-drift", "--blur-stem").returncode == 0
    for method in ("stats", "reconstruct"):
        proc = cli("calibrate", converted, "--teacher", teacher, "--images", images, "-o", tmp_path / "o.onnx",
                   "--method", method)  # fmt: skip
        assert proc.returncode == 2 and "the teacher must be the model that was converted" in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
