"""Module scopes of sites on dynamo exports: a Conv with BatchNorm folded into it is listed under the
convolution's own module path (the exporter records the BatchNorm's), so --include/--exclude mean
what the user reads in the model's `named_modules()`, and the twin selects the same sites."""

from __future__ import annotations

import pytest
import timm
import torch

import aa_deploy
from aa_deploy.common import model_io
from aa_deploy.converters.export import export
from aa_deploy.twin.network import antialias_with

pytestmark = pytest.mark.zoo


def _conv_paths(module: torch.nn.Module) -> set[str]:
    return {name for name, m in module.named_modules() if isinstance(m, torch.nn.Conv2d)}


def test_timm_folded_batchnorm_sites_carry_the_conv_path(tmp_path):
    torch.manual_seed(0)
    module = timm.create_model("mobilenetv3_small_050", pretrained=False).eval()
    path = export(module, tmp_path / "m.onnx", (2, 3, 64, 64))
    actions = aa_deploy.inspect(model_io.load(path))
    convs = [a for a in actions if a.site.kind == "strided-conv"]
    assert len(convs) >= 4
    assert all(a.site.scope in _conv_paths(module) for a in convs), [a.site.scope for a in convs]
    assert not any("bn" in a.site.scope for a in convs)

    # Selecting by a conv's module path picks that site, in ONNX and in the twin alike.
    target = convs[1].site.scope
    options = aa_deploy.Options(include=rf"^{target}$")
    selected = [a for a in aa_deploy.inspect(model_io.load(path), options) if a.action != "skip"]
    assert [a.site.scope for a in selected] == [target]
    _, twin_sites = antialias_with(module, options)
    assert [s.name for s in twin_sites if s.action != "skip"] == [target]


def test_torchvision_efficientnet_scopes_are_conv_modules(zoo_model):
    zoo = zoo_model("efficientnet_b0")
    actions = aa_deploy.inspect(model_io.load(zoo.onnx))
    convs = [a for a in actions if a.site.kind == "strided-conv"]
    assert convs and all(a.site.scope in _conv_paths(zoo.module) for a in convs), [a.site.scope for a in convs]
