"""Every command on graphs exported the ways users export them: fixed batch 1 and 4, dynamic batch,
torch's dynamo and TorchScript exporters; a classifier, a detector-like two-output head, a dense map,
a LayerNorm net. Each command ends in exit 0, or in one line on stderr with exit 2 where it truly does
not apply (TensorRT on this machine) — never a traceback. Where it runs, its figures are checked too.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from PIL import Image

from aa_deploy.cli import main
from aa_deploy.common.bundled import PHOTOS as BUNDLED_PHOTOS
from tests import sweep_models

pytestmark = pytest.mark.zoo

# (model, batch or None for dynamic, dynamo exporter?)
CORPUS = [
    ("classifier", 1, True),
    ("classifier", 4, True),
    ("classifier", None, True),
    ("classifier", 1, False),
    ("detector", 1, True),
    ("detector", 1, False),
    ("dense_map", 1, True),
    ("dense_map", 4, False),
    ("layernorm_net", 1, True),
    ("layernorm_net", 1, False),
]


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory):
    """30 crops of the bundled public-domain photos (calibrate needs 20 or more images)."""
    folder = tmp_path_factory.mktemp("calib")
    rng = np.random.default_rng(0)
    for path in sorted(BUNDLED_PHOTOS.glob("*.jpg")):
        image = np.asarray(Image.open(path).convert("RGB"))
        for k in range(5):
            s = int(rng.integers(48, 160))
            y, x = (int(rng.integers(0, d - s)) for d in image.shape[:2])
            Image.fromarray(image[y : y + s, x : x + s]).save(folder / f"{path.stem}_{k}.png")
    return folder


def _cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def _ok(result, what):
    code, out, err = result
    assert code == 0, f"{what}: exit {code}: {err}"
    return out


def _one_line(result, what):
    code, _, err = result
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, f"{what}: exit {code}: {err}"
    return err


@pytest.mark.parametrize("name,batch,dynamo", CORPUS, ids=lambda v: str(v))
def test_every_command(name, batch, dynamo, tmp_path, calib_dir, capsys):
    label = f"{name}, batch {batch or 'dynamic'}, {'dynamo' if dynamo else 'TorchScript'}"
    src = sweep_models.export(name, tmp_path / "m.onnx", batch, dynamo)
    aa = tmp_path / "m.aa.onnx"
    dims = [
        d.dim_value or d.dim_param
        for d in onnx.load(src, load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    ]
    assert dims[0] == (batch or dims[0])

    _ok(_cli(capsys, "inspect", src), f"inspect ({label})")
    _ok(_cli(capsys, "convert", src, "-o", aa, "-q"), f"convert ({label})")
    out = _ok(
        _cli(
            capsys,
            "verify",
            aa,
            "--reference",
            f"tests.sweep_models:{name}",
            "--count",
            6,
            "--report",
            tmp_path / "v.json",
        ),
        f"verify ({label})",
    )
    assert "PASS" in out
    assert all(o["passed"] for o in json.loads((tmp_path / "v.json").read_text())["outputs"])

    report = tmp_path / "c.json"
    consistency = ["consistency", src, "--compare", aa, "--images", calib_dir, "--passes", 2, "--report", report]
    if name == "dense_map":  # compared after undoing the shift: whole output cells (stride 4)
        consistency += ["--protocol", "circular", "--shift", 4]
    _ok(_cli(capsys, *consistency), f"consistency ({label})")
    models = json.loads(report.read_text())["models"]
    metric = {r["metric"] for r in models.values()}
    assert metric == ({"output cosine"} if name in ("detector", "dense_map") else {"top-1 agreement"}), (label, metric)
    assert all(0 <= r["consistency"] <= 1 and r["images"] == 30 for r in models.values())
    if name == "detector":
        _ok(_cli(capsys, *consistency, "--output", "scores"), f"consistency --output scores ({label})")
        _one_line(_cli(capsys, *consistency, "--output", "nope"), f"consistency --output nope ({label})")
    if name == "dense_map":
        err = _one_line(
            _cli(capsys, "consistency", src, "--images", calib_dir), f"pad-and-crop on a dense map ({label})"
        )
        assert "--protocol circular" in err

    out = _ok(_cli(capsys, "probe", src, "--compare", aa, "--images", calib_dir, "--count", 6), f"probe ({label})")
    assert "strided-conv" in out
    out = _ok(
        _cli(capsys, "quantize", aa, "--calib-images", calib_dir, "-o", tmp_path / "m.int8.onnx"), f"quantize ({label})"
    )
    assert "shape inference before quantizing" in out
    onnx.checker.check_model(str(tmp_path / "m.int8.onnx"))

    cal = ["calibrate", aa, "--teacher", src, "--images", calib_dir, "-o", tmp_path / "m.cal.onnx"]
    out = _ok(_cli(capsys, *cal, "--method", "reconstruct"), f"calibrate --method reconstruct ({label})")
    assert (tmp_path / "m.cal.onnx").exists() and "calibrated on 30 images" in out
    if name in ("detector", "dense_map"):
        err = _one_line(_cli(capsys, *cal, "--method", "distill"), f"calibrate distill ({label})")
        assert "--method reconstruct" in err

    build = ["build", aa, "-o", tmp_path / "m.engine"] + ([] if batch else ["--shapes", "input:1x3x32x32"])
    code, _, err = _cli(capsys, *build)
    assert code == 0 or (code == 2 and err.count("\n") == 1 and "TensorRT" in err), f"build ({label}): {err}"


def test_timm_convnextv2_fixed_batch_quantizes_and_calibrates(tmp_path, calib_dir, capsys):
    """A real LayerNorm/GRN net exported with a fixed batch of 1: onnxruntime's symbolic shape inference
    fails on it (quantize falls back), and the calibration bridge (LayerNormalization, Gelu, ReduceL2,
    run under vmap for more than one sample) computes what ONNX Runtime computes."""
    import timm
    import torch

    from aa_deploy.converters.bridge import load_module
    from aa_deploy.converters.onnxruntime import OnnxRuntimeRunner

    torch.manual_seed(0)
    module = timm.create_model("convnextv2_atto", pretrained=False).eval()
    src = tmp_path / "cnx.onnx"
    torch.onnx.export(module, (torch.rand(1, 3, 64, 64),), str(src), dynamo=True, external_data=False)
    aa = tmp_path / "cnx.aa.onnx"
    _ok(_cli(capsys, "convert", src, "-o", aa, "-q"), "convert")
    for path in (src, aa):
        _, bridge = load_module(path)
        x = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
        with torch.no_grad():
            got = bridge(torch.from_numpy(x)).numpy()
        ref = OnnxRuntimeRunner(path)(x)
        assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), path.name
    out = _ok(_cli(capsys, "quantize", aa, "--calib-images", calib_dir, "-o", tmp_path / "q.onnx"), "quantize")
    assert "symbolic shape inference failed" in out
    out = _ok(
        _cli(
            capsys,
            "calibrate",
            aa,
            "--teacher",
            src,
            "--images",
            calib_dir,
            "--method",
            "stats",
            "-o",
            tmp_path / "c.onnx",
        ),
        "calibrate --method stats",
    )
    assert "calibrated on 30 images" in out
