"""PyTorch -> ONNX with torch.onnx's dynamo exporter, and models named as `timm:NAME`,
`torchvision:NAME`, `aa:cifar10_resnet20|32` or a `package.module:factory` path."""

from __future__ import annotations

import importlib
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from aa_deploy.common import bundled
from aa_deploy.common.atomic import atomic_path
from aa_deploy.common.errors import InputError
from aa_deploy.common.models.cifar_resnet import cifar_resnet
from aa_deploy.common.models.efficientnet_lite import SIZES, efficientnet_lite

DEFAULT_OPSET = 18


def load_model(spec: str, weights: str | os.PathLike | None = None, seed: int = 0) -> tuple[nn.Module, bool]:
    """(model in eval mode, whether it holds trained weights) for a model name.

    Without weights the model is randomly initialized from `seed`, so `export` and `verify` in
    different processes build the same model.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _load_model(spec, weights)


def _load_model(spec: str, weights: str | os.PathLike | None) -> tuple[nn.Module, bool]:
    source, _, name = spec.partition(":")
    if not name:
        raise InputError(f"model name {spec!r}: expected timm:NAME, torchvision:NAME, aa:NAME or module:factory")
    trained = weights is not None
    if source == "aa":
        if name in SIZES and weights is None:
            return efficientnet_lite(name), True
        depth = {"cifar10_resnet20": 20, "cifar10_resnet32": 32}.get(name)
        if depth is None:
            raise InputError(
                f"unknown model {name!r} (aa:cifar10_resnet20, aa:cifar10_resnet32, aa:efficientnet_lite0 or aa:efficientnet_lite2)"
            )
        if weights is None and depth == 20:
            weights, trained = bundled.RESNET20_WEIGHTS, True
        return cifar_resnet(depth, weights), trained
    if source == "timm":
        import timm

        try:
            model = timm.create_model(name, pretrained=False)
        except RuntimeError as e:
            raise InputError(f"timm: {e}") from None
    elif source == "torchvision":
        import torchvision

        try:
            model = torchvision.models.get_model(name, weights=None)
        except ValueError as e:
            raise InputError(f"torchvision: {e}") from None
    else:
        try:
            factory = getattr(importlib.import_module(source), name)
        except (ImportError, AttributeError) as e:
            raise InputError(f"cannot import {spec!r}: {e}") from None
        model = factory()
    if weights is not None:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    return model.eval(), trained


def export(
    model: nn.Module,
    path: str | os.PathLike,
    input_shape: tuple[int, ...],
    *,
    dynamic_batch: bool = True,
    opset: int = DEFAULT_OPSET,
    input_name: str = "input",
    output_name: str = "output",
) -> Path:
    """Export `model` to `path` with the dynamo exporter (BatchNorm folded by its optimizer)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise InputError(f"{path.parent}: output folder does not exist")
    if dynamic_batch and input_shape[0] == 1:
        input_shape = (2, *input_shape[1:])  # torch.export specializes a size-1 example dim to 1
    example = (torch.rand(*input_shape),)
    dynamic = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model.eval(),
            example,
            dynamo=True,
            opset_version=opset,
            dynamic_shapes=dynamic,
            input_names=[input_name],
            output_names=[output_name],
            verbose=False,
        )
    with atomic_path(path) as tmp:
        program.save(str(tmp))
    return path
