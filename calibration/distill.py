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

from aa_deploy.calibration.held_out import Figures, HeldOut, PerImage, worse
from aa_deploy.calibration.recipe import Recipe
from aa_deploy.calibration.teacher_targets import autocast, canvas_targets, logits, soft_targets
from aa_deploy.calibration.views import canvas_crops, centre, pad_crop, roll
from aa_deploy.common.images import batches
from aa_deploy.common.progress import Progress, silent
from aa_deploy.converters.bridge import OnnxModule

LR_CANDIDATES = (1e-4, 3e-4, 1e-3, 3e-3)
RANGE_PROBE = 256  # held-out images the range test's loss is measured on


@dataclass(frozen=True)
class Schedule:
    """How distillation trains: at most `max_epochs` of the cosine schedule (shortened to end `time_limit`
    seconds from the call), batches of `batch` images (`eval_batch` when only scoring), the rate `lr`
    (None: the range test's, on `probe` held-out images, `range_steps` steps a rate), the seed, and the
    image-decoding workers."""

    max_epochs: int = 45
    batch: int = 64
    eval_batch: int = 250
    lr: float | None = None
    seed: int = 0
    workers: int | None = None
    time_limit: float | None = None
    probe: int = RANGE_PROBE
    range_steps: int | None = None


@dataclass(frozen=True)
class Epoch:
    """One scored point of a schedule (epoch 0: its start, before training): the rate, the mean training loss,
    the held-out figures, and the schedule's length as replanned after it (None at the start)."""

    epoch: int
    lr: float
    loss: float | None
    figures: Figures
    planned: int | None = None


@dataclass(frozen=True)
class EpochsPlanned:
    """A progress event: the epochs expected to fit (from the range test's step time), each about
    `epoch_seconds`."""

    epochs: int
    epoch_seconds: float

    @property
    def seconds(self) -> float:
        return self.epochs * self.epoch_seconds


@dataclass
class DistillReport:
    lr: float
    lr_losses: dict
    epochs: int
    kept_epoch: int  # the schedule's last epoch, or 0 when the start was kept
    history: list[Epoch] = field(default_factory=list)
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


def invariance_loss(views: tuple[torch.Tensor, ...], temperature: float) -> torch.Tensor:
    """Mean KL(mean answer || each view's answer) at `temperature`, the mean held fixed: zero exactly
    when the student answers every shifted view of an image alike."""
    with torch.no_grad():
        mean = sum(F.softmax(v / temperature, 1) for v in views) / len(views)
    return sum(kd_loss(v, mean, temperature) for v in views) / len(views)


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


@dataclass
class _Snapshot:
    """The student at one point of a schedule: each held-out image's figures, the epoch, the weights."""

    per_image: PerImage
    epoch: int
    state: dict


class _Trainer:
    """One distillation's training: the cosine schedule at a rate (`fit`), scored after every epoch on the
    held-out slice, under the time limit's clock."""

    def __init__(self, student, teacher, train, checker: HeldOut, prepare, recipe: Recipe, schedule: Schedule,
                 report: Progress, targets, step_seconds: float | None, began: float):  # fmt: skip
        self.student, self.teacher, self.train, self.checker, self.prepare = student, teacher, train, checker, prepare
        self.recipe, self.schedule, self.report, self.targets = recipe, schedule, report, targets
        self.step_seconds, self.began = step_seconds, began
        self.rng = np.random.default_rng(schedule.seed)
        self.steps_per_epoch = math.ceil(len(train) / schedule.batch)
        self.last_epoch = 0.0  # seconds the last epoch took (with its scoring)
        self.history: list[Epoch] = []

    def left(self) -> float | None:
        limit = self.schedule.time_limit
        return None if limit is None else limit - (time.perf_counter() - self.began)

    def out_of_time(self) -> bool:
        return self.schedule.time_limit is not None and self.left() < self.last_epoch

    def _scored(self, averaged: WeightAverage | None) -> tuple[Figures, PerImage]:
        with averaged.swapped_in() if averaged is not None else nullcontext():
            scored = self.checker.score(self.student)
        return scored.figures, scored.per_image

    def _snapshot(self, per_image: PerImage, epoch: int, averaged: WeightAverage | None) -> _Snapshot:
        with averaged.swapped_in() if averaged is not None else nullcontext():
            return _Snapshot(per_image, epoch, copy.deepcopy(self.student.state_dict()))

    def _planned(self, began: float) -> int:
        """The schedule's length before its first epoch: from the range test's step time on the first run."""
        if self.step_seconds is None or len(self.history) != 1:
            return self.schedule.max_epochs
        expected = self.steps_per_epoch * self.step_seconds + time.perf_counter() - began
        planned = schedule_length(self.schedule.max_epochs, 0, self.left(), expected)
        self.report(EpochsPlanned(planned, expected))
        return planned

    def fit(self, lr: float) -> tuple[_Snapshot, _Snapshot]:
        """Train at `lr` over the cosine schedule; the student at its start and at its end."""
        s, recipe = self.schedule, self.recipe
        opt = torch.optim.SGD(list(self.student.trainable().values()), lr=lr, momentum=0.9)
        averaged = None
        if recipe.average_epochs > 0:
            averaged = WeightAverage(self.student, 1 - 1 / max(1.0, recipe.average_epochs * self.steps_per_epoch))
        began = time.perf_counter()
        figures, per_image = self._scored(None)
        first = self._snapshot(per_image, 0, None)
        self.history.append(Epoch(0, lr, None, figures))
        self.report(self.history[-1])
        planned, epoch = self._planned(began), 0
        while epoch < planned and not self.out_of_time():
            epoch += 1
            began = time.perf_counter()
            base, total = (epoch - 1) * self.steps_per_epoch, planned * self.steps_per_epoch
            loss = _epoch(
                self.student, self.teacher, self.train, self.prepare, opt, self.rng, s.batch, recipe,
                lambda k, base=base, total=total: lr * 0.5 * (1 + math.cos(math.pi * (base + k) / total)),
                eval_batch=s.eval_batch, workers=s.workers, averaged=averaged, targets=self.targets,
            )  # fmt: skip
            figures, per_image = self._scored(averaged)
            self.last_epoch = time.perf_counter() - began
            planned = schedule_length(s.max_epochs, epoch, self.left(), self.last_epoch)
            self.history.append(Epoch(epoch, lr, loss, figures, planned))
            self.report(self.history[-1])
        return first, (first if epoch == 0 else self._snapshot(per_image, epoch, averaged))


def distill(
    student: OnnxModule,
    teacher: OnnxModule,
    train,
    checker: HeldOut,
    prepare: Callable[[np.ndarray], np.ndarray],
    recipe: Recipe = Recipe(),
    schedule: Schedule = Schedule(),
    progress: Progress | None = None,
) -> DistillReport:
    """Train `student` in place towards `teacher`; `train` holds uint8 NHWC images (an array or
    `images.ImageFiles`), `checker` the held-out slice the figures are measured on. With a time limit, the
    schedule is replanned after each epoch to what the last one's duration says fits, so that its rate still
    decays to zero before the limit. `progress` receives `Advance` (teacher targets), `EpochsPlanned` and
    each `Epoch`."""
    began = time.perf_counter()
    s = schedule
    torch.manual_seed(s.seed)
    report = progress or silent
    targets = None
    if recipe.span:
        targets = canvas_targets(
            teacher, train, checker.size, prepare, recipe, s.eval_batch, s.seed, s.workers, progress=report
        )
    lr, lr_losses, step_seconds = s.lr, {}, None
    if lr is None:
        lr, lr_losses, step_seconds = range_test(
            student, teacher, train, checker.images[: s.probe], prepare, recipe, s.batch, s.seed, s.eval_batch,
            s.workers, targets, s.range_steps,
        )  # fmt: skip
    trainer = _Trainer(student, teacher, train, checker, prepare, recipe, s, report, targets, step_seconds, began)
    first, end = trainer.fit(lr)
    while s.lr is None and worse(end.per_image, first.per_image) and lr > min(LR_CANDIDATES):
        if trainer.out_of_time():
            break
        lr = max(c for c in LR_CANDIDATES if c < lr)  # that rate failed: the next smaller one, from the start
        student.load_state_dict(first.state)
        first, end = trainer.fit(lr)
    kept = first if worse(end.per_image, first.per_image) else end
    student.load_state_dict(kept.state)
    student.train(False)
    history = trainer.history
    return DistillReport(lr, lr_losses, history[-1].epoch, kept.epoch, history, time.perf_counter() - began)
