"""The GPU path's CPU-testable parts: shape profiles, sidecars, version checks, FP16 graphs, and the
clear error where TensorRT is missing. Building and running engines needs TensorRT and a GPU."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import onnx
import pytest

import aa_deploy
from aa_deploy.common import bundled
from aa_deploy.common.errors import InputError
from aa_deploy.converters.export import export
from aa_deploy.converters.precision import to_fp16
from aa_deploy.converters.tensorrt import Sidecar, check_version, parse_shapes
from aa_deploy.verification.comparator import Check
from aa_deploy.verification.parity import Deployed, Inputs
from tests import graphs as G
from tests.helpers import cli

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None


def test_parse_shapes():
    assert parse_shapes("x:1x3x224x224,8x3x224x224,32x3x224x224") == {
        "x": ((1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224))
    }
    assert parse_shapes("a:2x3; b/c:1x4,2x4,3x4") == {"a": ((2, 3),) * 3, "b/c": ((1, 4), (2, 4), (3, 4))}
    for bad in ["x", ":1x2", "x:1x2,2x2", "x:1x2,2x3x4,5x6", "x:4x3,2x3,8x3", "x:1xax3", "x:0x3", ""]:
        with pytest.raises(InputError):
            parse_shapes(bad)


def test_sidecar_round_trip_and_version_check(tmp_path):
    engine = tmp_path / "m.plan"
    engine.write_bytes(b"not really an engine")
    side = Sidecar("ab" * 32, "m.onnx", "10.9.0", "fp16", {"x": [[1, 3, 8, 8]] * 3})
    side.write(engine)
    back = Sidecar.read(engine)
    assert back == side
    check_version(back, "10.9.0")
    with pytest.raises(InputError, match="built by TensorRT 10.9.0, this is TensorRT 11.4.0"):
        check_version(back, "11.4.0")
    with pytest.raises(InputError, match="no sidecar"):
        Sidecar.read(tmp_path / "other.plan")


def test_fp16_graph_keeps_exact_blurs_and_parity(tmp_path):
    plain = export(bundled.resnet20(), tmp_path / "r20.onnx", (2, 3, 32, 32))
    aa_deploy.convert(plain, tmp_path / "r20.aa.onnx")
    assert to_fp16(tmp_path / "r20.aa.onnx", tmp_path / "r20.fp16.onnx") == []  # [1,2,1]/4 taps are exact in fp16
    m = onnx.load(tmp_path / "r20.fp16.onnx")
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # I/O stay float32
    result = aa_deploy.verify(
        tmp_path / "r20.fp16.onnx", bundled.resnet20(), Inputs("bundled:cifar10"), Check(precision="fp16")
    )
    assert result.passed and result.outputs[0].top1_agreement >= 0.99 and result.outputs[0].max_abs > 1e-4


def test_fp16_keeps_inexact_widened_blurs_in_float32(tmp_path):
    # rect at stride 3 widens to [1, 1, 1] / 3: not representable in float16, so that blur stays float32.
    src = tmp_path / "s3.onnx"
    onnx.save(G.conv_model([1, 3, 12, 12], strides=(3, 3)), src)
    aa_deploy.convert(src, tmp_path / "s3.aa.onnx", aa_deploy.Options(filter="rect", skip_stem=False))
    kept = to_fp16(tmp_path / "s3.aa.onnx", tmp_path / "s3.fp16.onnx")
    assert kept and all(name.startswith("aa_blur") for name in kept)
    m = onnx.load(tmp_path / "s3.fp16.onnx")
    taps = {n.input[1] for n in m.graph.node if n.name in kept}
    assert all(t.data_type == onnx.TensorProto.FLOAT for t in m.graph.initializer if t.name in taps)
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((1, 3, 12, 12), dtype=np.float32)
    y32 = ort.InferenceSession(str(tmp_path / "s3.aa.onnx")).run(None, {"X": x})[0]
    y16 = ort.InferenceSession(str(tmp_path / "s3.fp16.onnx")).run(None, {"X": x})[0]
    assert np.abs(y16 - y32).max() < 2e-2 * np.abs(y32).max()


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed: the missing-TensorRT message does not apply")
def test_build_without_tensorrt_says_what_is_missing_and_keeps_the_graph(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(G.conv_model(["N", 3, 16, 16]), src)
    proc = cli(
        "build", src, "--precision", "fp16", "--shapes", "X:1x3x16x16,4x3x16x16,8x3x16x16", "-o", tmp_path / "m.plan"
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "TensorRT is not installed" in proc.stderr and "m.fp16.onnx" in proc.stderr
    assert (tmp_path / "m.fp16.onnx").exists() and not (tmp_path / "m.plan").exists()


@pytest.mark.skipif(not HAVE_TRT, reason="needs the tensorrt package and an NVIDIA GPU (not on this machine)")
def test_engine_build_and_parity_on_gpu(tmp_path):  # pragma: no cover - runs only where TensorRT is
    plain = export(bundled.resnet20(), tmp_path / "r20.onnx", (2, 3, 32, 32))
    aa_deploy.convert(plain, tmp_path / "r20.aa.onnx")
    proc = cli(
        "build",
        tmp_path / "r20.aa.onnx",
        "--shapes",
        "input:1x3x32x32,16x3x32x32,128x3x32x32",
        "-o",
        tmp_path / "r20.plan",
    )
    assert proc.returncode == 0, proc.stderr
    result = aa_deploy.verify(
        tmp_path / "r20.plan", bundled.resnet20(), Inputs("bundled:cifar10"), deployed=Deployed("tensorrt")
    )
    assert result.passed, result.outputs


def test_engine_runs_in_chunks_no_larger_than_its_profile_max():
    """A dynamic-batch engine whose profile ends at 8 gets 20 samples as 8 + 8 + 4; one with a single
    batch size gets exactly that many (filled), as ONNX Runtime's fixed-batch graphs do."""
    from aa_deploy.converters.batching import run_in_batches
    from aa_deploy.converters.tensorrt import profile_batches

    seen = []

    def run(feeds):
        seen.append(len(feeds["x"]))
        return [feeds["x"] * 2]

    x = np.arange(20, dtype=np.float32).reshape(20, 1)
    fixed, most = profile_batches({"x": [[1, 3, 8, 8], [4, 3, 8, 8], [8, 3, 8, 8]]})
    assert (fixed, most) == (None, 8)
    out = run_in_batches(run, {"x": x}, fixed, lambda: ["y"], most)[0]
    assert seen == [8, 8, 4] and np.array_equal(out, x * 2)
    seen.clear()
    fixed, most = profile_batches({"x": [[4, 3, 8, 8]] * 3})
    assert run_in_batches(run, {"x": x[:6]}, fixed, lambda: ["y"], most)[0].shape == (6, 1) and seen == [4, 4]


def test_the_sidecar_keeps_the_onnx_path_relative_to_the_engine(tmp_path):
    """An engine and its ONNX source moved together still find each other."""
    (tmp_path / "a" / "models").mkdir(parents=True)
    side = Sidecar(
        "ab" * 32, os.path.relpath(tmp_path / "a" / "models" / "m.onnx", tmp_path / "a"), "10.9.0", "fp16", {}
    )
    assert side.onnx_path == os.path.join("models", "m.onnx")
    moved = tmp_path / "b"
    assert side.onnx_file(moved / "m.plan") == moved / "models" / "m.onnx"
