"""How `calibrate --time-limit` spends its minutes: every step sized to fit before it runs.

The limit covers the whole command. What runs before the plan (decoding the held-out images, the checks
against ONNX Runtime) is timed as it happens, and so is one teacher forward, one student forward and one
training step on a few held-out images (`measure_rates`). The plan is made and printed from those rates
before anything long runs:

0. the held-out slice is cut to the images whose figures (the teacher's answers on them, the opening
   figures of both models, the closing ones) fit OPENING_SHARE of the limit (`held_out_size`, at least
   HELD_FLOOR images), and the opening figures are reserved;
1. the final held-out figures are reserved too, and OUTPUT_SHARE of the limit for writing the result: the
   command ends with them;
2. the closed-form start reads at most START_SHARE of what is left (at least START_FLOOR images, unless
   not even those fit what is left: then what fits, at least START_LEAST);
3. the learning-rate range test gets at most RANGE_SHARE: fewer probe images and steps;
4. distillation gets the rest and trains at least MIN_EPOCHS epochs: the training images (and with
   canvas views the teacher targets, computed once per image) are cut to what fits.

On the CPU the threads are fitted to the cores other processes leave free before the rates are measured
and again after the opening figures, after the start and before the closing figures (`aa_deploy.common.threads`:
beside another job fewer threads are faster); each fit times the student on a few images, and the rates
follow the machine's speed.

When not even one batch of training images fits MIN_EPOCHS epochs, the plan drops distillation and the
closed-form start is the result; the plan says so before anything runs. After the start the plan is
made again from the time really left, so a start slower than its estimate takes its overrun from the
training images, not from the limit. Distillation's own clock (`distill.schedule_length`) then ends
its cosine schedule by the limit less the final figures. Without a limit every step runs at its
default size and nothing is measured.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import torch

from aa_deploy.calibration.distill import LR_CANDIDATES
from aa_deploy.calibration.teacher_targets import autocast
from aa_deploy.converters.bridge import OnnxModule

START_SHARE = 0.2
OPENING_SHARE = 0.25  # the held-out slice's figures, before and after, within this share of the limit
OUTPUT_SHARE = 0.02  # kept for writing and checking the result after the closing figures
HELD_FLOOR = 10  # held-out images a time limit may cut the slice to
RANGE_SHARE = 0.1
MIN_EPOCHS = 2
START_FLOOR = 32  # images: fewer leave the deepest layers' least squares underdetermined
START_LEAST = 8  # images, when not even START_FLOOR fit the limit (the ridge then holds the deepest layers)
PROBE_FLOOR = 32
RANGE_STEPS_FLOOR = 3
# The closed-form start decodes its images and runs the teacher and the student node by node over them
# (from the image again where their activations do not fit in memory) besides solving each conv's least
# squares: in forwards of both models, START_FIXED whatever the images (the solves) and START_PASSES per
# image. EfficientNet-Lite0 at 224 px on two CPU cores took 216 of them on 8 images, 730 on 32 and 2,299 on
# 128 (8, 24 and 76 s); the CIFAR ResNets fewer. A start faster than this estimate leaves its time to
# distillation (`replan_after_start`).
START_FIXED = 300.0
START_PASSES = 18.0


@dataclass(frozen=True)
class Rates:
    """Seconds per image on this machine, measured with these models; `figures`: seconds of one held-out
    scoring of the student (distillation scores once per epoch, and once before the first), `final` of the
    closing one."""

    teacher: float
    student: float
    step: float  # one training step: forward and backward over all of the student's views
    figures: float
    decode: float = 0.0  # reading one image from disk (the training images are decoded once)
    final: float | None = None  # seconds of the closing figures (more views than an epoch's); None: `figures`
    opening: float = 0.0  # seconds of the opening figures still to run (0 once they ran)

    @property
    def closing(self) -> float:
        return self.figures if self.final is None else self.final

    def scaled(self, factor: float) -> Rates:
        """Every rate `factor` times slower (the figures and the opening as they are)."""
        return replace(self, teacher=self.teacher * factor, student=self.student * factor, step=self.step * factor,
                       decode=self.decode * factor)  # fmt: skip

    def all_scaled(self, factor: float) -> Rates:
        """Every rate, the figures' seconds included, `factor` times slower (the machine itself slower)."""
        final = None if self.final is None else self.final * factor
        return replace(self.scaled(factor), figures=self.figures * factor, final=final, opening=self.opening * factor)


def held_out_size(limit: float | None, spent: float, held: int, per_image: float) -> int:
    """The held-out images (of `held`) whose figures, `per_image` seconds each, fit OPENING_SHARE of what is
    left of `limit` (None: all of them), at least HELD_FLOOR."""
    if limit is None or per_image <= 0:
        return held
    fit = int(OPENING_SHARE * max(0.0, limit - spent) // per_image)
    return int(np.clip(fit, min(HELD_FLOOR, held), held))


@dataclass(frozen=True)
class Sizes:
    """What each step reads: the start's images, the training images distillation uses (and the teacher
    targets it computes), the range test's probe images and steps per candidate rate."""

    start_images: int
    train_images: int
    probe_images: int
    range_steps: int
    distill: bool = True


@dataclass(frozen=True)
class TimePlan:
    """The sizes and the seconds each step is expected to take ("held-out figures" while the opening ones are
    still to run, "start", "targets", "range test", "distillation", "final figures"; "targets": decoding the
    training images, and their teacher targets with canvas views), `epochs` of distillation they leave,
    within `limit` seconds of which `spent` were used before the plan (None: no limit, the default sizes);
    `held_out`: the images the figures are measured on."""

    sizes: Sizes
    limit: float | None = None
    spent: float = 0.0
    seconds: dict | None = None
    epochs: int = 0
    targets: bool = False  # the teacher's targets are computed once per training image ("targets" includes them)
    held_out: int = 0


@dataclass(frozen=True)
class Work:
    """What the steps do per image: teacher forwards for one image's target (canvas views: computed once,
    `2 x teacher views`; 0 where the teacher runs inside each step), and teacher forwards inside one training
    step (the views each step's target averages), the training batch, and the schedule's longest length."""

    target_passes: int
    step_teacher_passes: int
    batch: int
    max_epochs: int
    distill: bool


def start_seconds(images: int, rates: Rates) -> float:
    return (START_FIXED + images * START_PASSES) * (rates.teacher + rates.student)


def start_images(seconds: float, rates: Rates) -> int:
    """The images whose closed-form start fits `seconds` (0 when not even its fixed part does)."""
    passes = seconds / max(rates.teacher + rates.student, 1e-12) - START_FIXED
    return max(0, int(passes // START_PASSES))


def range_seconds(probe: int, steps: int, rates: Rates, work: Work) -> float:
    per_probe = max(work.target_passes, work.step_teacher_passes, 1) * rates.teacher + rates.student
    return probe * per_probe + len(LR_CANDIDATES) * steps * work.batch * _step(rates, work)


def _step(rates: Rates, work: Work) -> float:
    return rates.step + work.step_teacher_passes * rates.teacher


def _training_images(seconds: float, rates: Rates, work: Work) -> int:
    """Training images whose targets and MIN_EPOCHS epochs (each with its held-out scoring) fit `seconds`."""
    fixed = (MIN_EPOCHS + 1) * rates.figures
    per_image = rates.decode + work.target_passes * rates.teacher + MIN_EPOCHS * _step(rates, work)
    return int(max(0.0, seconds - fixed) // per_image) if per_image > 0 else 0


def plan_time(limit: float | None, spent: float, rates: Rates | None, defaults: Sizes, work: Work) -> TimePlan:
    """The steps sized to end within `limit` seconds, `spent` of them gone (see the module's docstring)."""
    if limit is None or rates is None:
        return TimePlan(defaults)
    left = limit * (1 - OUTPUT_SHARE) - spent - rates.opening - rates.closing
    share = START_SHARE if work.distill else 1.0  # the closed-form methods are the start alone
    start = int(
        np.clip(start_images(share * left, rates), min(START_FLOOR, defaults.start_images), defaults.start_images)
    )
    if start_seconds(start, rates) > left:  # not even the floor fits: what does, the limit before the floor
        start = int(np.clip(start_images(left, rates), min(START_LEAST, start), start))
    sizes = replace(defaults, start_images=start)
    if work.distill:
        sizes = _distill_sizes(sizes, left - start_seconds(start, rates), rates, work)
    else:
        sizes = replace(sizes, distill=False)
    return _estimate(sizes, limit, spent, rates, work)


def replan_after_start(plan: TimePlan, spent: float, rates: Rates | None, defaults: Sizes, work: Work) -> TimePlan:
    """`plan` made again once the start has run, `spent` seconds into the limit: distillation's sizes
    from the time really left."""
    if plan.limit is None or rates is None or not work.distill:
        return plan
    left = plan.limit * (1 - OUTPUT_SHARE) - spent - rates.closing
    sizes = _distill_sizes(replace(defaults, start_images=plan.sizes.start_images), left, rates, work)
    return _estimate(sizes, plan.limit, spent, rates, work, start_done=True)


def _distill_sizes(sizes: Sizes, left: float, rates: Rates, work: Work) -> Sizes:
    """The range test within RANGE_SHARE of `left` seconds, then the training images that fit the rest."""
    probe, steps = sizes.probe_images, sizes.range_steps
    probe_floor, steps_floor = min(PROBE_FLOOR, probe), min(RANGE_STEPS_FLOOR, steps)
    while range_seconds(probe, steps, rates, work) > RANGE_SHARE * left and (
        probe > probe_floor or steps > steps_floor
    ):
        probe, steps = max(probe_floor, probe * 3 // 4), max(steps_floor, steps * 3 // 4)
    train = min(sizes.train_images, _training_images(left - range_seconds(probe, steps, rates, work), rates, work))
    if train < min(work.batch, sizes.train_images):
        return replace(sizes, train_images=0, probe_images=0, range_steps=0, distill=False)
    return replace(sizes, train_images=train, probe_images=probe, range_steps=steps)


def _estimate(sizes: Sizes, limit: float, spent: float, rates: Rates, work: Work, start_done: bool = False) -> TimePlan:
    seconds = {"held-out figures": rates.opening} if rates.opening else {}
    seconds["start"] = 0.0 if start_done else start_seconds(sizes.start_images, rates)
    epochs = 0
    if sizes.distill:
        seconds["targets"] = sizes.train_images * (rates.decode + work.target_passes * rates.teacher)
        seconds["range test"] = range_seconds(sizes.probe_images, sizes.range_steps, rates, work)
        left = limit * (1 - OUTPUT_SHARE) - spent - rates.closing - sum(seconds.values())
        epoch = sizes.train_images * _step(rates, work) + rates.figures
        epochs = int(np.clip((left - rates.figures) // epoch, 0, work.max_epochs)) if epoch > 0 else 0
        seconds["distillation"] = rates.figures + epochs * epoch
    seconds["final figures"] = rates.closing
    return TimePlan(sizes, limit, spent, seconds, epochs, targets=work.target_passes > 0)


def forward(module: OnnxModule, x: torch.Tensor) -> None:
    """One inference forward of `module` over the prepared batch `x`, as the rates time it."""
    with torch.no_grad(), autocast(module.device):
        module(x.to(module.device))


def measure_rates(
    teacher: OnnxModule, student: OnnxModule, x: torch.Tensor, views: int, figures: float, decode: float,
    final: float | None = None,
) -> Rates:  # fmt: skip
    """Seconds per image of a teacher forward, a student forward and a training step (forward and backward
    of `views` views, weights untouched), on the prepared batch `x` (a few images), after one warm-up."""

    def timed(run) -> float:
        run()
        began = time.perf_counter()
        run()
        return (time.perf_counter() - began) / len(x)

    device = student.device

    def step():
        student.train(False)
        with autocast(device):
            out = student(x.repeat(views, 1, 1, 1).to(device))
        out.float().square().mean().backward()
        for p in student.trainable().values():
            p.grad = None

    return Rates(
        timed(lambda: forward(teacher, x)), timed(lambda: forward(student, x)), timed(step), figures, decode, final
    )
