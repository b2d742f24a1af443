"""`aa-deploy calibrate`: converted ONNX + original ONNX + unlabeled images -> calibrated ONNX.

load both graphs -> split the images (a held-out slice for early stopping and the summary) ->
a closed-form start (`pointwise`, `reconstruct` or `stats`) -> `distill` (default) -> write the weights back by
initializer name -> check -> save.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from aa_deploy import graph, model_io
from aa_deploy.atomic import refuse_overwrite
from aa_deploy.calibration.distill import Recipe, distill
from aa_deploy.calibration.held_out import HeldOut, centre
from aa_deploy.calibration.reconstruct import calibrate_reconstruct
from aa_deploy.calibration.stats import calibrate_stats
from aa_deploy.consistency.paired import paired_difference
from aa_deploy.converters.bridge import OnnxModule, write_back
from aa_deploy.errors import InputError
from aa_deploy.images import ImageFiles, Preprocess, list_images, load_rgb, normalize, preprocess_for, spread

METHODS = ("stats", "reconstruct", "distill")
# Where distill starts from: `pointwise` refits the 1x1 convs and the classifier by least squares and
# rescales the spatial convs (`reconstruct.calibrate_reconstruct(spatial=False)`); `reconstruct` refits
# every conv; `stats` rescales every conv.
STARTS = ("pointwise", "reconstruct", "stats")
# What the training views and held-out figures shift: crops of the image resized before its centre crop
# (`canvas`), or the centre crop itself by pad-and-crop and circular rolls (`shift`).
VIEWS = ("auto", "canvas", "shift")


@dataclass
class CalibrationResult:
    method: str
    images: int
    held_out: int
    before: dict  # held-out figures (held_out.HeldOut.figures) before calibration
    after: dict
    teacher: dict
    seconds: float
    lr: float | None = None
    epochs: int | None = None
    kept_epoch: int | None = None  # the schedule's last epoch, or 0: the start was kept
    history: list = field(default_factory=list)
    # calibrated minus original consistency on the held-out images (same shifts: paired), per protocol
    versus_teacher: dict = field(default_factory=dict)
    device: str = "cpu"
    batch: tuple[int, int] = (0, 0)  # evaluation, training
    activation_mb: float = 0.0  # activations one sample produces in a forward pass


EVAL_BUDGET = 1 << 30  # bytes of activations one evaluation batch may produce
TRAIN_BUDGET = 3 << 29  # bytes of activations one training batch keeps for the backward pass
CACHE_BUDGET = 256 << 20  # training images held decoded in memory; beyond it they stream from disk
# The closed-form start reads enough images for about START_POSITIONS positions per channel at the
# input, and at least START_MIN: the deepest layers (7x7 maps with over a thousand input channels at
# ImageNet size) need a few hundred images for their least-squares refit, affordable since each node
# runs once per image (calibration/frontier.py). Decoded at once, within START_BUDGET bytes of float32.
START_POSITIONS = 1 << 20
START_MIN = 256
START_BUDGET = 256 << 20


def resolve_device(name: str) -> torch.device:
    """auto: the GPU when torch sees one, else the CPU; cuda without one is a clear error."""
    if name not in ("auto", "cpu", "cuda"):
        raise InputError(f"device must be auto, cpu or cuda, not {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError(
            "--device cuda: torch sees no CUDA GPU here (use --device cpu, or install a CUDA build of torch)"
        )
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def batch_sizes(module: OnnxModule, sample: torch.Tensor, train: int | None, views: int) -> tuple[int, int, int]:
    """(evaluation batch, training batch, bytes per sample): sized so that one batch's activations
    stay within EVAL_BUDGET / TRAIN_BUDGET (a training batch keeps them all, for each view)."""
    per_sample = max(1, module.activation_bytes(sample))
    evaluation = int(np.clip(EVAL_BUDGET // per_sample, 1, 250))
    if train is None:
        train = int(np.clip(TRAIN_BUDGET // (per_sample * views), 4, 64))
    return evaluation, train, per_sample


def _split(files: list[Path], held_out: float, seed: int) -> tuple[list[Path], list[Path]]:
    order = np.random.default_rng(seed).permutation(len(files))
    n_held = int(np.clip(round(held_out * len(files)), 10, 500))
    return [files[i] for i in order[:n_held]], [files[i] for i in order[n_held:]]


def calibrate(
    model: str | os.PathLike,
    teacher: str | os.PathLike,
    images: str | os.PathLike,
    output: str | os.PathLike,
    *,
    method: str = "distill",
    start: str = "pointwise",
    preprocess: Preprocess | None = None,
    held_out: float = 0.1,
    limit: int | None = None,
    max_epochs: int = 45,
    lr: float | None = None,
    seed: int = 0,
    recipe: Recipe | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    workers: int | None = None,
    progress: Callable[[dict], None] | None = None,
    check: bool = True,
    time_limit: float | None = None,
    rescale_after_blur: bool = False,
    views: str = "auto",
) -> CalibrationResult:
    """Calibrate the converted `model` against `teacher` on the unlabeled `images`; writes `output`.
    `progress` receives {"phase": ...} records: load / start (name, done, total), epoch (a history record).
    `time_limit` (seconds from the call) sets the length of distillation's schedule to what fits, replanned after each epoch.
    `rescale_after_blur`: `reconstruct` (as the method or the start) rescales the spatial convs that read a blur's
    output instead of refitting them. `views`: `canvas` trains on, and measures with, crops of the
    image resized before its centre crop (`preprocess.resize` > `preprocess.size`), `shift` on pad-and-crop
    shifts and circular rolls of the centre crop; `auto` (default) is `canvas` wherever the
    preprocessing has such a resize."""

    if method not in METHODS:
        raise InputError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    if start not in STARTS:
        raise InputError(f"start must be one of {', '.join(STARTS)}, not {start!r}")
    start = method if method != "distill" else start
    if time_limit is not None and time_limit <= 0:
        raise InputError(f"--time-limit must be positive, not {time_limit / 60:g} minutes")
    if max_epochs < 1:
        raise InputError(f"--epochs must be 1 or more, not {max_epochs}")
    if batch_size is not None and batch_size < 1:
        raise InputError(f"--batch-size must be 1 or more, not {batch_size}")
    report_progress = progress or (lambda record: None)
    recipe = recipe or Recipe()
    if recipe.shift < 1:
        raise InputError(f"--shift must be 1 pixel or more, not {recipe.shift}")
    if recipe.invariance < 0 or recipe.average_epochs < 0:
        raise InputError("--invariance and --average-epochs must be 0 or more")
    if (recipe.student_views is not None and recipe.student_views < 1) or recipe.teacher_views < 0:
        raise InputError("--student-views must be 1 or more, --teacher-views 0 or more")
    if views not in VIEWS:
        raise InputError(f"views must be one of {', '.join(VIEWS)}, not {views!r}")
    began = time.perf_counter()
    torch.manual_seed(seed)
    dev = resolve_device(device)
    model_path, out_path = Path(model), Path(output)
    refuse_overwrite(out_path, model_path, teacher)
    student_ir = model_io.load(model_path)
    teacher_ir = model_io.load(teacher)
    student, teacher_m = OnnxModule(student_ir).eval().to(dev), OnnxModule(teacher_ir).eval().to(dev)
    dims = [d if isinstance(d, int) else None for d in (graph.data_inputs(student_ir.graph)[0].shape or [])]
    preprocess = preprocess_for(dims[-1] if dims else None, preprocess)
    span = max(0, (preprocess.resize or 0) - preprocess.size)
    if views == "canvas" and not span:
        raise InputError(
            f"--views canvas crops the image resized before its centre crop, and this preprocessing resizes to "
            f"the model's {preprocess.size} px (give --preprocess with a larger resize, or --views shift)"
        )
    span = span if views != "shift" else 0
    recipe = replace(recipe, span=span, student_views=recipe.student_views or (1 if span else 2))
    # Canvas views: every image decoded at the resize, its centre crop being what the model sees in use.
    decode = replace(
        preprocess, size=preprocess.size + span, resize=(preprocess.size + span) if span else preprocess.resize
    )
    files = spread(list_images(images), limit, images)
    if len(files) < 20:
        raise InputError(f"{images}: {len(files)} images is too few to calibrate (need 20 or more)")

    def prepare(x: np.ndarray) -> np.ndarray:
        return normalize(x, preprocess)

    held_files, train_files = _split(files, held_out, seed)
    held = np.stack([load_rgb(p, decode) for p in held_files])
    eval_batch, train_batch, per_sample = batch_sizes(
        student, torch.from_numpy(prepare(centre(held[:1], span))), batch_size, recipe.student_views
    )
    # Training images: decoded once when they fit CACHE_BUDGET, else decoded batch by batch from disk.
    train = ImageFiles(train_files, decode)
    if len(train) * held[0].nbytes <= CACHE_BUDGET:
        decoded = []
        for i in range(0, len(train), 250):
            decoded.append(train[np.arange(i, min(i + 250, len(train)))])
            report_progress({"phase": "load", "done": i + len(decoded[-1]), "total": len(train)})
        train = np.concatenate(decoded)

    checker = HeldOut(teacher_m, held, prepare, seed=seed, batch=eval_batch, shift=recipe.shift, span=span)
    if method == "distill" and not checker.classifier:
        raise InputError(
            "distill matches the class probabilities of an (N, classes) output, and this model's output is not one "
            "(a dense map or a detection head): use --method reconstruct (or stats)"
        )
    teacher_summary, teacher_runs, _ = checker.figures(teacher_m, final=True)
    before, _, _ = checker.figures(student, final=True)

    view = checker.view[0]
    n_start = int(np.clip(START_POSITIONS // (view.shape[0] * view.shape[1]), START_MIN, 1000))
    n_start = min(n_start, len(train), max(16, START_BUDGET // (4 * view.nbytes)))

    # Decoded once (256..1,000 images, START_BUDGET at most): the closed-form start (distill's:
    # `pointwise` unless told) goes through them layer by layer.
    x_start = torch.from_numpy(prepare(centre(train[np.arange(n_start)], span)))
    start_step = {
        "stats": calibrate_stats,
        "reconstruct": partial(calibrate_reconstruct, after_blur=not rescale_after_blur),
        "pointwise": partial(calibrate_reconstruct, spatial=False),
    }[start]
    start_step(
        student, teacher_m, x_start, eval_batch,
        progress=lambda done, total: report_progress({"phase": "start", "name": start, "done": done, "total": total}),
    )  # fmt: skip
    report = None
    if method == "distill":
        report = distill(
            student, teacher_m, train, checker, prepare, recipe=recipe, max_epochs=max_epochs,
            batch=train_batch, eval_batch=eval_batch, lr=lr, seed=seed, workers=workers,
            progress=lambda record: report_progress({"phase": "epoch"} | record),
            time_limit=None if time_limit is None else time_limit - (time.perf_counter() - began),
        )  # fmt: skip
    after, after_runs, _ = checker.figures(student, final=True)
    versus = {key: paired_difference(teacher_runs[key], after_runs[key]).as_dict() for key in after_runs}

    values = {name: p.detach().cpu().numpy() for name, p in student.trainable().items()}
    write_back(student_ir, values)
    result = CalibrationResult(
        method,
        len(files),
        len(held),
        before,
        after,
        teacher_summary,
        time.perf_counter() - began,
        lr=report.lr if report else None,
        epochs=report.epochs if report else None,
        kept_epoch=report.kept_epoch if report else None,
        history=report.history if report else [],
        versus_teacher=versus,
        device=str(dev),
        batch=(eval_batch, train_batch),
        activation_mb=per_sample / 2**20,
    )
    model_io.write_metadata(
        student_ir,
        {
            "calibration": {
                "method": method,
                "start": start,
                "rescale_after_blur": rescale_after_blur,
                "images": str(images),
                "count": len(files),
                "held_out": len(held),
                "seed": seed,
                "lr": result.lr,
                "epochs": result.epochs,
                "kept_epoch": result.kept_epoch,
                "recipe": asdict(recipe),
                "views": "canvas" if span else "shift",
                "score": f"fidelity + mean({', '.join(checker.protocols(final=False))}) on the held-out images",
                "original": teacher_summary,
                "before": before,
                "after": after,
                "versus_teacher": versus,
                "preprocess": preprocess.as_dict(),
            }
        },
    )
    model_io.save(student_ir, out_path, external=model_io.uses_external_data(student_ir), check=check)
    return result
