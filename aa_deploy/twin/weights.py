"""Weights trained on the ONNX graph, put back into the PyTorch twin, so that a calibrated model is
verified against an independent reference: the twin module tree with the calibrated values.

Exporters fold each BatchNorm into the conv before it, and `calibrate` trains those folded weights
(by initializer name, `<module path>.weight` and its bias). The twin keeps the conv and the
BatchNorm apart, so the folded values go into the conv (weight) and the BatchNorm (bias), and the
BatchNorm becomes an exact identity scale (weight 1, running mean 0, running variance 1 - eps).
A conv is paired with the BatchNorm that reads its output by running the twin once with hooks.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from aa_deploy.common import graph, model_io
from aa_deploy.common.errors import InputError
from aa_deploy.common.inserted import blur_after
from aa_deploy.twin.network import ConvBlurPool, DenseSite, PreBlur, run_with_hooks

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _unwrap(module: nn.Module) -> nn.Module:
    while isinstance(module, (PreBlur, ConvBlurPool, DenseSite)):
        module = module.conv if isinstance(module, ConvBlurPool) else module.module
    return module


def conv_to_norm(twin: nn.Module, sample: torch.Tensor) -> dict[nn.Module, nn.Module]:
    """conv (unwrapped) -> the BatchNorm whose input is that conv's (or its wrapper's) output."""
    produced: dict[int, tuple] = {}  # id -> (the tensor, kept alive so that its id is not reused; the conv)
    pairs: dict[nn.Module, nn.Module] = {}

    def conv_done(module, inputs, output) -> None:  # a forward hook must return None
        produced.setdefault(id(output), (output, _unwrap(module)))

    def norm_seen(module, inputs, output) -> None:
        if id(inputs[0]) in produced:
            pairs.setdefault(produced[id(inputs[0])][1], module)

    hooks = []
    for module in twin.modules():
        if isinstance(module, (PreBlur, ConvBlurPool, *_CONVS)):
            hooks.append((module, conv_done))
        elif isinstance(module, _NORMS):
            hooks.append((module, norm_seen))
    run_with_hooks(twin, sample, hooks)
    return pairs


@torch.no_grad()
def load_folded_weights(twin: nn.Module, model: ir.Model, sample: torch.Tensor) -> int:
    """Copy the conv weights/biases and linear layers of the ONNX `model` into `twin` (in place).
    Returns the number of tensors placed; an initializer that has no place in the twin is an error."""
    twin.eval()
    modules = dict(twin.named_modules())
    norms = conv_to_norm(twin, sample)
    blurpool = model_io.sites_where(model, "blurpool")
    placed = 0
    for node in model.graph:
        if node.op_type not in ("Conv", "Gemm") or node.inputs[1] is None:
            continue
        name = node.inputs[1].name
        weight = graph.const_array(node.inputs[1])
        if weight is None or not name.endswith(".weight") or name[: -len(".weight")] not in modules:
            continue  # a blur's taps, or a weight computed in the graph
        holder = (blur_after(node) if node.name in blurpool else None) or node
        holder = holder if holder.op_type == "Conv" and len(holder.inputs) > 2 and holder.inputs[2] else node
        bias = graph.const_array(holder.inputs[2]) if len(holder.inputs) > 2 and holder.inputs[2] else None
        layer = _unwrap(modules[name[: -len(".weight")]])
        w = torch.from_numpy(np.array(weight, np.float32))
        if node.op_type == "Gemm" and node.attributes.get_int("transB", 0) == 0:
            w = w.t()
        if tuple(layer.weight.shape) != tuple(w.shape):
            raise InputError(f"{name}: shape {tuple(w.shape)} does not fit the twin's {tuple(layer.weight.shape)}")
        layer.weight.copy_(w)
        placed += 1
        if bias is None:
            continue
        b = torch.from_numpy(np.array(bias, np.float32))
        norm = norms.get(layer)
        if norm is None:
            if layer.bias is None:
                raise InputError(f"{name}: the graph has a bias for it, the twin has neither a bias nor a BatchNorm")
            layer.bias.copy_(b)
        else:
            if layer.bias is not None:
                layer.bias.zero_()
            norm.weight.fill_(1.0)
            norm.bias.copy_(b)
            norm.running_mean.zero_()
            norm.running_var.fill_(1.0 - norm.eps)
        placed += 1
    if not placed:
        raise InputError("no weight of the graph is named after a module of the twin (<module path>.weight)")
    return placed
