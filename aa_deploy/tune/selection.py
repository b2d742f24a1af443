"""The images `tune` decides on: a deterministic split of the user's folder into a calibration part and a
selection part, and the figures every candidate is measured by on the selection part (the same held-out
figures `calibrate` scores with, and one-pixel consistency beside them); accuracy also on the calibration
part for the candidates that were not calibrated on it."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from aa_deploy.calibration.calibrate import Views
from aa_deploy.calibration.held_out import HeldOut
from aa_deploy.calibration.teacher_targets import logits
from aa_deploy.calibration.views import centre
from aa_deploy.common.errors import InputError
from aa_deploy.common.images import csv_labels, folder_labels, list_images, load_rgb, spread
from aa_deploy.consistency import measure
from aa_deploy.consistency.protocols import ConsistencyResult
from aa_deploy.converters.onnxruntime import OnnxRuntimeRunner

MIN_PART = 20  # images each part needs at least: calibrate's own minimum
ONE_PIXEL_STEPS = 8
# Random pairs per image of the deciding protocol. A pair's answer is a coin flip within each image, and on
# 1,000 CIFAR images 20 pairs narrow a gain's interval by a quarter against 5 (docs/results.md); pad-and-crop
# views of a small input cost little, a canvas model's views 50-200x more, so it keeps 5.
PASSES_SMALL, PASSES_CANVAS = 20, 5


@dataclass(frozen=True)
class Split:
    """The folder's images (at most `limit`, spread over it) in two parts, by a permutation drawn from `seed`."""

    root: Path
    calibration: tuple[Path, ...]
    selection: tuple[Path, ...]
    seed: int

    def as_dict(self) -> dict:
        return {
            "images": str(self.root), "calibration": len(self.calibration), "selection": len(self.selection),
            "seed": self.seed, "rule": "a permutation of the sorted files drawn from the seed; nothing is "
            "calibrated on the selection part",
        }  # fmt: skip


def split(folder: str | os.PathLike, fraction: float, seed: int, limit: int | None = None) -> Split:
    """`fraction` of the images for selection, the rest for calibration; each part MIN_PART images or more."""
    files = spread(list_images(folder), limit, folder)
    if len(files) < 2 * MIN_PART:
        raise InputError(
            f"{folder}: {len(files)} images is too few to tune on (a calibration part and a selection part of "
            f"{MIN_PART} or more each: {2 * MIN_PART} images)"
        )
    order = np.random.default_rng(seed).permutation(len(files))
    n = int(np.clip(round(fraction * len(files)), MIN_PART, len(files) - MIN_PART))
    pick = lambda idx: tuple(sorted(files[i] for i in idx))  # noqa: E731
    return Split(Path(folder), pick(order[n:]), pick(order[:n]), seed)


@contextmanager
def linked(root: Path, files: tuple[Path, ...]) -> Iterator[Path]:
    """A temporary folder holding `files` at their paths under `root` (links; copies where links fail), for
    the commands that read a folder."""
    with tempfile.TemporaryDirectory(prefix="aa-deploy-tune-") as tmp:
        for f in files:
            target = Path(tmp) / f.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                target.symlink_to(f.resolve())
            except OSError:
                shutil.copyfile(f, target)
        yield Path(tmp)


class SessionModule:
    """An ONNX Runtime session as the held-out figures call a model (`HeldOut` takes the bridge's
    `OnnxModule`): a torch batch in, the first output out, on the CPU. Candidates are measured as they ship,
    in ONNX Runtime, which also runs them faster than the bridge."""

    device = torch.device("cpu")

    def __init__(self, runner: OnnxRuntimeRunner) -> None:
        self.runner = runner

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.runner(x.numpy())))

    def train(self, mode: bool = True) -> SessionModule:
        return self


@dataclass(frozen=True)
class Measured:
    """One model on the selection images, per image: accuracy hits (top-1 against the labels, else against the
    original's shift-averaged answer), the deciding protocol's result and one-pixel consistency's; and its
    accuracy hits on the calibration part where it was not calibrated on it (else None)."""

    accuracy: np.ndarray
    consistency: ConsistencyResult
    one_pixel: ConsistencyResult
    unseen_accuracy: np.ndarray | None = None


def _labels(labels: str | os.PathLike | None, files: tuple[Path, ...], root: Path) -> np.ndarray | None:
    """Each file's class from the `file,label` CSV, else from a folder per class where there is one, else None."""
    return csv_labels(labels, list(files), root) if labels else folder_labels(list(files), root)


def _decoded(files: tuple[Path, ...], views: Views) -> np.ndarray:
    """`files` decoded as the model's views take them (canvases where the views are their crops)."""
    return np.stack([load_rgb(p, views.decode) for p in files])


def _checker(teacher: SessionModule, images: np.ndarray, views: Views, seed: int, batch: int) -> HeldOut:
    """Decoded `images` with the original's answers on them (its shift-averaged one among them)."""
    return HeldOut(
        teacher, images, views.prepare, seed=seed, batch=batch, shift=views.recipe.shift, span=views.span,
        passes=PASSES_CANVAS if views.span else PASSES_SMALL,
    )  # fmt: skip


class Selection:
    """The selection images decoded as the model's views take them, and the original's answers on them; the
    calibration part's (`unseen`) centre views and what they are scored against, for accuracy alone, which a
    candidate not calibrated on it is measured on too: the tolerance is checked on every image a candidate
    never learned from."""

    def __init__(self, teacher: SessionModule, files: tuple[Path, ...], root: Path, views: Views, *,
                 labels: str | os.PathLike | None, seed: int, batch: int, unseen: tuple[Path, ...] = ()) -> None:  # fmt: skip
        self.views, self.batch, self.teacher = views, batch, teacher
        known = _labels(labels, files + unseen, root)  # both parts at once: a folder's classes index the same
        self.labels = None if known is None else known[: len(files)]
        self.checker = _checker(teacher, _decoded(files, views), views, seed, batch)
        if not self.checker.classifier:
            raise InputError("tune compares classes, and this model's output is not (N, classes)")
        self.protocol = self.checker.protocols(final=False)[0]
        self.unseen_view = self.unseen_target = None
        if unseen:  # with labels, the centre views alone; else the original's shift-averaged answers on them too
            images = _decoded(unseen, views)
            self.unseen_view = centre(images, views.span)
            self.unseen_target = (
                known[len(files) :]
                if known is not None
                else _checker(teacher, images, views, seed, batch).averaged_top1
            )

    @property
    def accuracy_name(self) -> str:
        return "top-1" if self.labels is not None else "fidelity"

    def measure(self, module: SessionModule, calibrated: bool = False) -> Measured:
        """`module`'s figures; `calibrated`: it learned from the calibration part, so its accuracy there is not
        counted."""
        scored = self.checker.score(module, final=False, first=True)
        hits = scored.per_image.fidelity if self.labels is None else self._hits(module, self.checker.view, self.labels)
        more = None
        if self.unseen_view is not None and not calibrated:
            more = self._hits(module, self.unseen_view, self.unseen_target)
        return Measured(hits.astype(np.float64), scored.runs[self.protocol.name], self._one_pixel(module), more)

    def _hits(self, module: SessionModule, view: np.ndarray, target: np.ndarray) -> np.ndarray:
        """Top-1 on the centre views `view` against `target` (labels, or the original's shift-averaged answers)."""
        top1 = logits(module, self.views.prepare, view, self.batch).argmax(1).numpy()
        return (top1 == target).astype(np.float64)

    def _one_pixel(self, module: SessionModule) -> ConsistencyResult:
        """One-pixel diagonal steps: crops of the canvas where the views are its crops (as many steps as it has
        room for, at most ONE_PIXEL_STEPS), else of the zero-padded image."""
        checker = self.checker
        steps = min(ONE_PIXEL_STEPS, checker.span) if checker.span else ONE_PIXEL_STEPS
        return measure(
            "one-pixel", module.runner, self.views.prepare, checker.images, crop=checker.size, shift=steps,
            pad=None if checker.span else "zero", batch=min(self.batch, 64),
        )  # fmt: skip
