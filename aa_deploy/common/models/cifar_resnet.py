"""CIFAR-10 ResNet-20/32 (He et al. 2016, CIFAR variant), matching Y. Idelbayev's trained checkpoints.

The option-A shortcut is a module of its own (:class:`SubsampleShortcut`) rather than a lambda, so the
PyTorch twin can see it as a strided-slice site, exactly as the ONNX pass sees the exported Slice.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
DEPTH_BLOCKS = {20: 3, 32: 5, 44: 7, 56: 9}


class SubsampleShortcut(nn.Module):
    """Option-A shortcut: every `stride`-th pixel, channels zero-padded on both sides."""

    antialias_site = "strided-slice"  # tells the twin this module subsamples its NCHW input

    def __init__(self, stride: int, pad_channels: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad_channels = pad_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride
        return F.pad(x[:, :, ::s, ::s], (0, 0, 0, 0, self.pad_channels, self.pad_channels))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = SubsampleShortcut(stride, planes // 4)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, blocks_per_stage: int, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(blocks_per_stage):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.linear(out)


def cifar_resnet(depth: int = 20, weights: str | Path | None = None) -> CifarResNet:
    """A CIFAR ResNet of `depth` layers, loaded from an Idelbayev-style checkpoint if given."""
    if depth not in DEPTH_BLOCKS:
        raise ValueError(f"CIFAR ResNet depth must be one of {sorted(DEPTH_BLOCKS)}, not {depth}")
    model = CifarResNet(DEPTH_BLOCKS[depth])
    if weights is not None:
        checkpoint = torch.load(weights, map_location="cpu", weights_only=True)
        state = checkpoint.get("state_dict", checkpoint)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        model.load_state_dict(state)
    return model.eval()
