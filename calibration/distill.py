"""`distill` calibration: label-free distillation of the converted model from the original.

Each step blends pairs of unlabeled images (mixup; new points where the student must match the
teacher), shifts the blend at random (pad-and-crop, +-`shift` px; the second student view a circular
roll instead, so both kinds of shift are trained on), and trains the student (the
converted graph, run by `OnnxModule`) to reproduce a *shift-averaged* teacher: the teacher's class
probabilities averaged over `teacher_views` other random shifts of the same blend (KL divergence at
temperature 2). Matching the teacher view by view would teach the student the teacher's flips under
shift, which is the aliasing the blurs removed; the averaged teacher is what test-time augmentation
of the original would answer, so it keeps the accuracy signal without the aliasing.

The learning rate comes from a short range test over small rates (BatchNorm-folded weights diverge
at the usual rates). Training starts from the closed-form start (`pointwise` unless told) and runs the whole cosine
schedule (`max_epochs`, shortened to end within `time_limit` when one is given); the weights at
its end are kept. The held-out score (`held_out.per_image_score`, averaged over the images)

    score = fidelity + (pad-and-crop consistency + circular consistency) / 2

where fidelity is top-1 agreement with the shift-averaged teacher and the consistencies are the
two protocols `calibrate` reports, on fixed shifts, is measured after every epoch and decides one
thing: when the end is *worse* than the start (`held_out.worse`: its fidelity or its score below
the start's with the whole one-sided 95 % bootstrap interval of the paired per-image difference), that rate
failed; the next smaller candidate is tried from the start, and when none is left (or no time),
the start is kept. The paired interval keeps noise (a difference of half an image on a small
slice) from throwing away a schedule, and guarding fidelity on its own keeps a consistency gain
from paying for a loss of accuracy.

The end is kept, not the best-scoring epoch: at a plateau the held-out score moves from epoch to
epoch by more than the differences it would choose between, so the best epoch is mostly the
luckiest (its figures biased upwards). Measurements: docs/results.md, "Calibration on the CIFAR
ResNets".
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from aa_deploy.calibration.held_out import (
    HeldOut,
    autocast,
    canvas_crops,
    centre,
    logits,
    pad_crop,
    soft_targets,
    worse,
)
from aa_deploy.consistency.protocols import roll_each
from aa_deploy.converters.bridge import OnnxModule
from aa_deploy.images import batches
from aa_deploy.input_format import Size

LR_CANDIDATES = (1e-4, 3e-4, 1e-3, 3e-3)
RANGE_PROBE = 256  # held-out images the range test's loss is measured on


@dataclass(frozen=True)
class Recipe:
    """What each distillation step trains on (the defaults are the shipped recipe)."""

    shift: int = 4  # pad-and-crop shifts of +-shift px (circular rolls too, with `circular`)
    mix: bool = True  # blend pairs of images first
    teacher_views: int = 4  # teacher averaged over this many shifts of each blend; 0: the student's own view
    # shifted views of each blend the student trains on, all to one target; None: 2, or 1 crop of a canvas
    # (cached targets make the student the whole cost of a step: one view is twice the epochs in the same time)
    student_views: int | None = None
    temperature: float = 2.0
    invariance: float = 0.0  # weight of a term pulling the student's views towards their own mean answer
    circular: bool = True  # every second student view is a circular roll (+-shift px) instead of a pad-and-crop
    average_epochs: float = 0.0  # >0: scored and kept are the weights' exponential average over about this many epochs
    # >0: the images are canvases `span` px larger than the model's input (the resize before the centre crop),
    # and every view is a crop of one at offsets 0..span, mirrored at random: the shifts a user's images
    # undergo, with real content at every border. The target, the teacher's answer averaged over
    # `teacher_views` such crops and their mirror images, is computed once per image and reused every epoch
    # (so no mixup).
    span: int = 0


@dataclass
class DistillReport:
    lr: float
    lr_losses: dict
    epochs: int
    kept_epoch: int  # the schedule's last epoch, or 0 when the start was kept
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def mixup(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each image blended with another of the batch, weight ~ U(0, 1), as float32 NHWC: new points on
    which the student must match the teacher (the teacher sees the same blend, so any input serves)."""
    lam = rng.random(len(images)).reshape(-1, 1, 1, 1).astype(np.float32)
    other = images[rng.permutation(len(images))]
    return lam * images.astype(np.float32) + (1 - lam) * other.astype(np.float32)


def kd_loss(student_logits: torch.Tensor, target: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """KL(target || student) at `temperature`; `target` holds probabilities at that temperature."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits.float() / t, 1), target, reduction="batchmean") * t * t


def roll(images: np.ndarray, shift: int, rng: np.random.Generator) -> np.ndarray:
    """Random circular shifts within +-shift pixels (the content wraps around); NHWC, any dtype."""
    return roll_each(images, rng.integers(-shift, shift + 1, size=(len(images), 2)))


def invariance_loss(views: tuple[torch.Tensor, ...], temperature: float) -> torch.Tensor:
    """Mean KL(mean answer || each view's answer) at `temperature`, the mean held fixed: zero exactly
    when the student answers every shifted view of an image alike."""
    with torch.no_grad():
        mean = sum(F.softmax(v / temperature, 1) for v in views) / len(views)
    return sum(kd_loss(v, mean, temperature) for v in views) / len(views)


def canvas_targets(
    teacher, canvases, size: Size, prepare, recipe: Recipe, batch: int, seed: int, workers=None, progress=None
) -> torch.Tensor:
    """Each canvas's target: the teacher's probabilities at the recipe's temperature, averaged over
    `teacher_views` crops at random offsets and their mirror images (float32, on the CPU)."""
    rng = np.random.default_rng(seed + 2)
    out = []
    for chunk in batches(canvases, np.arange(len(canvases)), batch, workers):
        views = []
        for _ in range(max(1, recipe.teacher_views)):
            crops = canvas_crops(chunk, size, rng, mirror=False)
            views += [crops, crops[:, :, ::-1]]
        out.append(soft_targets(teacher, views, prepare, recipe.temperature, batch))
        if progress:
            progress(sum(len(o) for o in out), len(canvases))
    return torch.cat(out)


def _step_views(base: np.ndarray, recipe: Recipe, rng: np.random.Generator) -> tuple[list, list]:
    """Student views of a batch of (blended) images, and the teacher views its target averages."""
    student = [
        roll(base, recipe.shift, rng) if recipe.circular and k % 2 else pad_crop(base, recipe.shift, rng)
        for k in range(recipe.student_views)
    ]
    teacher = [pad_crop(base, recipe.shift, rng) for _ in range(recipe.teacher_views)] or student
    return student, teacher


def _epoch(
    student, teacher, images, prepare, opt, rng, batch, recipe, lr_at, steps=None, eval_batch=250, workers=None,
    averaged=None, targets=None,
):  # fmt: skip
    """One pass over `images` (or its first `steps` batches); the mean loss. `averaged` (a
    `WeightAverage` of `student`) is updated after every step. `targets` (canvas recipes): each
    image's cached target, by position in `images`."""
    losses = []
    order = rng.permutation(len(images))
    indices = [order[i : i + batch] for i in range(0, len(order), batch)]
    for k, (index, chunk) in enumerate(zip(indices, batches(images, order, batch, workers))):
        if steps is not None and k >= steps:
            break
        if targets is not None:
            size = (chunk.shape[1] - recipe.span, chunk.shape[2] - recipe.span)
            views = [canvas_crops(chunk, size, rng) for _ in range(recipe.student_views)]
            target = targets[index].to(student.device)
        else:
            base = mixup(chunk, rng) if recipe.mix else chunk.astype(np.float32)
            views, teacher_views = _step_views(base, recipe, rng)
            target = soft_targets(teacher, teacher_views, prepare, recipe.temperature, eval_batch).to(student.device)
        for group in opt.param_groups:
            group["lr"] = lr_at(k)
        student.train(False)
        with autocast(student.device):
            out = student(torch.from_numpy(prepare(np.concatenate(views))))
        loss = kd_loss(out, target.repeat(len(views), 1), recipe.temperature)
        if recipe.invariance and len(views) > 1:
            loss = loss + recipe.invariance * invariance_loss(out.float().chunk(len(views)), recipe.temperature)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if averaged is not None:
            averaged.update()
        losses.append(float(loss.detach()))
    return float(np.mean(losses)) if losses else float("nan")


class WeightAverage:
    """An exponential moving average of `module`'s trainable weights (`decay` per step), which
    `swapped_in` puts in place of the weights for a while (to score it, or copy it)."""

    def __init__(self, module: OnnxModule, decay: float) -> None:
        self.params = list(module.trainable().values())
        self.average = [p.detach().clone() for p in self.params]
        self.decay = decay

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1 - self.decay)

    @contextmanager
    def swapped_in(self):
        with torch.no_grad():
            own = [p.detach().clone() for p in self.params]
            for p, a in zip(self.params, self.average):
                p.copy_(a)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, o in zip(self.params, own):
                    p.copy_(o)


def schedule_length(max_epochs: int, done: int, left: float | None, epoch_seconds: float) -> int:
    """Epochs the cosine schedule spans: `max_epochs`, or fewer when `left` seconds (None: no limit)
    hold only so many more epochs of `epoch_seconds` after the `done` ones; never fewer than `done`."""
    if left is None or epoch_seconds <= 0:
        return max_epochs
    return max(done, min(max_epochs, done + int(max(left, 0.0) // epoch_seconds)))


def default_range_steps(images: int, batch: int) -> int:
    """The range test's steps per candidate rate: an epoch's worth, between 5 and 20."""
    return max(5, min(20, images // batch))


def range_test(
    student, teacher, train, probe: np.ndarray, prepare, recipe, batch, seed, eval_batch=250, workers=None,
    targets=None, steps=None,
):  # fmt: skip
    """Learning rate from a short range test: `steps` steps (default `default_range_steps`) from the same
    start per candidate, the lowest distillation loss against the shift-averaged teacher on held-out images
    decides. Returns (rate, {candidate: loss}, seconds one training step took)."""
    start_state = copy.deepcopy(student.state_dict())
    if targets is not None:
        views = [centre(probe, recipe.span)]
        size = views[0].shape[1:3]
        target = canvas_targets(teacher, probe, size, prepare, recipe, eval_batch, seed, workers)
    else:
        views, teacher_views = _step_views(probe.astype(np.float32), recipe, np.random.default_rng(seed))
        target = soft_targets(teacher, teacher_views, prepare, recipe.temperature, eval_batch)
    steps = default_range_steps(len(train), batch) if steps is None else steps
    step_seconds = []
    losses = {}
    for candidate in LR_CANDIDATES:
        opt = torch.optim.SGD(list(student.trainable().values()), lr=candidate, momentum=0.9)
        rng = np.random.default_rng(seed)
        began = time.perf_counter()
        _epoch(
            student, teacher, train, prepare, opt, rng, batch, recipe, lambda k, c=candidate: c, steps, eval_batch,
            workers, targets=targets,
        )  # fmt: skip
        step_seconds.append((time.perf_counter() - began) / steps)
        loss = float(kd_loss(logits(student, prepare, views[0], eval_batch), target, recipe.temperature))
        losses[candidate] = loss if math.isfinite(loss) else float("inf")
        student.load_state_dict(start_state)
    return min(losses, key=losses.get), losses, float(np.median(step_seconds))


def distill(
    student: OnnxModule,
    teacher: OnnxModule,
    train,
    checker: HeldOut,
    prepare: Callable[[np.ndarray], np.ndarray],
    *,
    recipe: Recipe = Recipe(),
    max_epochs: int = 45,
    batch: int = 64,
    eval_batch: int = 250,
    lr: float | None = None,
    seed: int = 0,
    workers: int | None = None,
    progress: Callable[[dict], None] | None = None,
    time_limit: float | None = None,
    probe: int = RANGE_PROBE,
    range_steps: int | None = None,
) -> DistillReport:
    """Train `student` in place towards `teacher`; `train` holds uint8 NHWC images (an array or
    `images.ImageFiles`), `checker` the held-out slice the figures are measured on. With `time_limit`
    (seconds from the call), the schedule is replanned after each epoch to what the last one's
    duration says fits, so that its rate still decays to zero before the limit. The range test
    measures on the first `probe` held-out images, `range_steps` steps per rate."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)

    report = progress or (lambda record: None)
    targets = None
    if recipe.span:
        targets = canvas_targets(
            teacher, train, checker.size, prepare, recipe, eval_batch, seed, workers,
            progress=lambda done, total: report({"phase": "targets", "done": done, "total": total}),
        )  # fmt: skip
    lr_losses = {}
    chosen = lr is not None  # the caller's rate is kept as given
    steps_per_epoch = math.ceil(len(train) / batch)
    if lr is None:
        lr, lr_losses, step_seconds = range_test(
            student, teacher, train, checker.images[:probe], prepare, recipe, batch, seed, eval_batch, workers, targets,
            range_steps,
        )  # fmt: skip
    else:
        step_seconds = None

    last_epoch = 0.0  # seconds the last epoch took (with its evaluation)

    def left() -> float | None:
        return None if time_limit is None else time_limit - (time.perf_counter() - start)

    def out_of_time() -> bool:
        return time_limit is not None and left() < last_epoch

    def fit(lr: float, history: list[dict]) -> tuple:
        """Train at `lr` over the cosine schedule; (per-image scores, epoch, weights) at its start and at its end."""
        nonlocal last_epoch
        opt = torch.optim.SGD(list(student.trainable().values()), lr=lr, momentum=0.9)
        averaged = None
        if recipe.average_epochs > 0:
            averaged = WeightAverage(student, 1 - 1 / max(1.0, recipe.average_epochs * steps_per_epoch))
        began = time.perf_counter()
        figures, _, per_image = checker.figures(student)
        first = (per_image, 0, copy.deepcopy(student.state_dict()))
        history.append({"epoch": 0, "lr": lr, "loss": None} | figures)
        report(history[-1])
        planned, epoch = max_epochs, 0
        if step_seconds is not None and len(history) == 1:  # the expected wall time, from the range test's steps
            expected = steps_per_epoch * step_seconds + time.perf_counter() - began
            planned = schedule_length(max_epochs, 0, left(), expected)
            report({"phase": "plan", "epochs": planned, "epoch_seconds": expected, "seconds": planned * expected})
        while epoch < planned and not out_of_time():
            epoch += 1
            began = time.perf_counter()
            base, total = (epoch - 1) * steps_per_epoch, planned * steps_per_epoch
            loss = _epoch(
                student, teacher, train, prepare, opt, rng, batch, recipe,
                lambda k, base=base, total=total: lr * 0.5 * (1 + math.cos(math.pi * (base + k) / total)),
                eval_batch=eval_batch, workers=workers, averaged=averaged, targets=targets,
            )  # fmt: skip
            with averaged.swapped_in() if averaged is not None else nullcontext():
                figures, _, per_image = checker.figures(student)
            last_epoch = time.perf_counter() - began
            planned = schedule_length(max_epochs, epoch, left(), last_epoch)
            history.append({"epoch": epoch, "lr": lr, "loss": loss, "planned": planned} | figures)
            report(history[-1])
        if epoch == 0:
            return first, first
        with averaged.swapped_in() if averaged is not None else nullcontext():
            return first, (per_image, epoch, copy.deepcopy(student.state_dict()))

    history: list[dict] = []
    first, end = fit(lr, history)
    while not chosen and worse(end[0], first[0]) and lr > min(LR_CANDIDATES) and not out_of_time():
        lr = max(c for c in LR_CANDIDATES if c < lr)
        student.load_state_dict(first[2])
        first, end = fit(lr, history)
    kept = first if worse(end[0], first[0]) else end
    student.load_state_dict(kept[2])
    student.train(False)
    return DistillReport(lr, lr_losses, history[-1]["epoch"], kept[1], history, time.perf_counter() - start)
