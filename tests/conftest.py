"""Shared fixtures: each zoo model is built and exported once per test session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from aa_deploy.converters.export import export, load_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@dataclass
class ZooModel:
    name: str
    module: torch.nn.Module
    onnx: Path
    shape: tuple[int, ...]  # input shape without the batch axis


# name -> (spec, input size, expected number of downsampling sites)
ZOO = {
    "cifar_resnet20": ("aa:cifar10_resnet20", 32, 4),
    "resnet18": ("torchvision:resnet18", 64, 8),
    "resnet50": ("torchvision:resnet50", 64, 8),
    "mobilenet_v3_small": ("torchvision:mobilenet_v3_small", 64, 5),
    "densenet121": ("torchvision:densenet121", 64, 5),
    "efficientnet_b0": ("torchvision:efficientnet_b0", 64, 5),
    "swin_t": ("torchvision:swin_t", 224, 4),
    "convnext_tiny": ("timm:convnext_tiny", 64, 4),
    "swin_tiny_patch4_window7_224": ("timm:swin_tiny_patch4_window7_224", 224, 4),
}


@pytest.fixture(scope="session")
def zoo_model(tmp_path_factory):
    cache: dict[str, ZooModel] = {}

    def get(name: str) -> ZooModel:
        if name not in cache:
            spec, size, _ = ZOO[name]
            torch.manual_seed(0)
            module, _ = load_model(spec)
            path = tmp_path_factory.mktemp("zoo") / f"{name}.onnx"
            export(module, path, (2, 3, size, size))
            cache[name] = ZooModel(name, module, path, (3, size, size))
        return cache[name]

    return get
