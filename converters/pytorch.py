"""A PyTorch module behind the runner interface `run(feeds) -> outputs` (the reference side)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class TorchRunner:
    """Runs `module` in eval mode, fp32 exactly (TF32 off), on the CPU or a given device."""

    def __init__(self, module: nn.Module, device: str = "cpu") -> None:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        self.module = module.eval().to(device)
        self.device = device

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            out = self.module(*(torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for v in feeds.values()))
        outs = out if isinstance(out, (tuple, list)) else [out]
        return [o.detach().float().cpu().numpy() for o in outs]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.run({"x": x})[0]
