"""The teacher's answers calibration trains towards: its logits in batches, its probabilities averaged over
shifted views of the same images (`soft_targets`), and, for canvas recipes, each canvas's target computed
once (`canvas_targets`)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from aa_deploy.calibration.recipe import Recipe
from aa_deploy.calibration.views import canvas_crops
from aa_deploy.common.images import batches
from aa_deploy.common.input_format import Size
from aa_deploy.common.progress import Progress, counter
from aa_deploy.converters.bridge import OnnxModule


def autocast(device: torch.device):
    """bfloat16 mixed precision on a GPU, nothing on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@torch.no_grad()
def logits(module: OnnxModule, prepare: Callable, images: np.ndarray, batch: int) -> torch.Tensor:
    """`module`'s first output for uint8/float NHWC `images`, in batches, as float32 on the CPU."""
    with autocast(module.device):
        outs = [
            module(torch.from_numpy(prepare(images[i : i + batch]))).float().cpu() for i in range(0, len(images), batch)
        ]
    return torch.cat(outs)


@torch.no_grad()
def soft_targets(teacher: OnnxModule, views: list[np.ndarray], prepare, temperature: float, batch: int) -> torch.Tensor:
    """The teacher's probabilities at `temperature`, averaged over `views` (the same images, shifted)."""
    return sum(F.softmax(logits(teacher, prepare, v, batch) / temperature, 1) for v in views) / len(views)


def canvas_targets(
    teacher,
    canvases,
    size: Size,
    prepare,
    recipe: Recipe,
    batch: int,
    seed: int,
    workers=None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Each canvas's target: the teacher's probabilities at the recipe's temperature, averaged over
    `teacher_views` crops at random offsets and their mirror images (float32, on the CPU)."""
    rng = np.random.default_rng(seed + 2)
    advance = counter(progress, "teacher targets (once per image)", len(canvases))
    out = []
    for chunk in batches(canvases, np.arange(len(canvases)), batch, workers):
        views = []
        for _ in range(max(1, recipe.teacher_views)):
            crops = canvas_crops(chunk, size, rng, mirror=False)
            views += [crops, crops[:, :, ::-1]]
        out.append(soft_targets(teacher, views, prepare, recipe.temperature, batch))
        advance(len(chunk))
    return torch.cat(out)
