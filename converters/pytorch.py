"""A PyTorch module behind the runner interface (`interface.Runner`): the reference side."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from aa_deploy.converters.interface import Runner


class TorchRunner(Runner):
    """Runs `module` in eval mode, fp32 exactly (TF32 off), on the CPU or a given device. `layout`: how
    the feeds are laid out ("NHWC" feeds, as an exported graph may take them, are given to the module
    as NCHW float32, as a PyTorch vision model takes them). Made active: the module is on its device."""

    input_names = ["input"]
    output_names = ["output"]

    def __init__(self, module: nn.Module, device: str = "cpu", layout: str = "NCHW") -> None:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        self.module = module.eval()
        self.device = device
        self.layout = layout
        self.activate()

    def _activate(self) -> None:
        self.module = self.module.to(self.device)

    def _release(self) -> None:
        self.module = self.module.to("cpu")  # the module is the caller's: kept, its device memory freed

    def _tensor(self, v: np.ndarray) -> torch.Tensor:
        if self.layout == "NHWC" and v.ndim == 4:
            v = v.transpose(0, 3, 1, 2).astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(v)).to(self.device)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self._active()
        with torch.no_grad():
            out = self.module(*(self._tensor(v) for v in feeds.values()))
        outs = out if isinstance(out, (tuple, list)) else [out]
        return [o.detach().float().cpu().numpy() for o in outs]


def multiply_adds(module: nn.Module, x: np.ndarray, runner: TorchRunner | None = None) -> int:
    """Multiply-adds of one forward pass of `module` on `x` (batch 1 for a per-image figure), as
    PyTorch's flop counter counts them (convolutions and matrix products; a multiply-add is 2 flops)."""
    from torch.utils.flop_counter import FlopCounterMode

    runner = runner or TorchRunner(module)
    with FlopCounterMode(display=False) as counter:
        runner.run({"input": x})
    return counter.get_total_flops() // 2
