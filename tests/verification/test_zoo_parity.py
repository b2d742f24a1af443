"""Real architectures: the converted ONNX model in ONNX Runtime matches the PyTorch twin.

For every filter, mode and padding, on batch sizes 1 and 3 through the dynamic batch axis,
max |ONNX - twin| <= 1e-4 relative to the output scale (max |twin output|); and the conversion must change the
outputs (else the parity would prove nothing).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import aa_deploy
from aa_deploy.converters.onnxruntime import OnnxRuntimeRunner
from aa_deploy.twin.network import antialias_with
from aa_deploy.verification.parity import Inputs
from tests.conftest import ZOO

pytestmark = pytest.mark.zoo

COMBOS = list(
    itertools.product(("rect", "triangle", "binomial"), ("auto", "pre", "blurpool"), ("reflect", "replicate", "zero"))
)


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_parity_all_options(name, zoo_model, tmp_path):
    zoo = zoo_model(name)
    expected_sites = ZOO[name][2]
    rng = np.random.default_rng(0)
    x3 = rng.standard_normal((3, *zoo.shape), dtype=np.float32)
    with torch.no_grad():
        plain = zoo.module(torch.from_numpy(x3)).numpy()
    failures = []
    for i, (filt, mode, pad) in enumerate(COMBOS):
        # Every other combination with the default stem rule, the others --blur-stem. The ImageNet models' first
        # site is a strided conv on the image: left strided by default, by the ONNX pass and the twin alike; the
        # CIFAR ResNet's is a stage transition at 16 channels, blurred either way.
        stem = (None, False)[i % 2]
        options = aa_deploy.Options(filter=filt, mode=mode, pad=pad, skip_stem=stem)
        out_path = tmp_path / f"{name}.{filt}.{mode}.{pad}.onnx"
        result = aa_deploy.convert(zoo.onnx, out_path, options)
        twin, twin_sites = antialias_with(zoo.module, options)
        if len(result.actions) != expected_sites or len(twin_sites) != expected_sites:
            failures.append(f"{filt}/{mode}/{pad}: {len(result.actions)} ONNX sites, {len(twin_sites)} twin sites")
        elif [s.action for s in twin_sites] != [a.action for a in result.actions]:
            failures.append(
                f"{filt}/{mode}/{pad}: actions differ "
                f"{[s.action for s in twin_sites]} vs {[a.action for a in result.actions]}"
            )
        skipped = [k for k, a in enumerate(result.actions) if a.action == "skip"]
        image_stem = stem is None and name != "cifar_resnet20"
        assert skipped == ([0] if image_stem else []), [a.describe() for a in result.actions]
        runner = OnnxRuntimeRunner(out_path)
        with torch.no_grad():
            ref = twin(torch.from_numpy(x3)).numpy()
        scale = float(np.abs(ref).max()) + 1e-12
        for batch in (1, 3):
            err = float(np.abs(runner(x3[:batch]) - ref[:batch]).max()) / scale
            if err > 1e-4:
                failures.append(f"{filt}/{mode}/{pad} batch {batch}: relative error {err:.2e}")
        del runner
        out_path.unlink()  # 27 models of up to 110 MB each: one on disk at a time
        change = float(np.abs(ref - plain).max()) / (float(np.abs(plain).max()) + 1e-12)
        assert change > 1e-3, f"{filt}/{mode}/{pad}: the blur did not change the outputs ({change:.1e})"
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_verify_gate(name, zoo_model, tmp_path):
    """The release checks through `aa_deploy.verify`: plain export vs plain model, converted vs twin."""
    zoo = zoo_model(name)
    images = "bundled:cifar10" if name == "cifar_resnet20" else None
    plain = aa_deploy.verify(zoo.onnx, zoo.module, Inputs(images, count=4))
    assert plain.passed, plain.outputs
    converted = tmp_path / "aa.onnx"
    aa_deploy.convert(zoo.onnx, converted)
    result = aa_deploy.verify(converted, zoo.module, Inputs(images, count=4))
    assert result.passed and result.reference_antialiased["filter"] == "triangle", result.outputs
