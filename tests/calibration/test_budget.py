"""calibration/budget.py: how a time limit is split between calibrate's steps (pure arithmetic on measured rates)."""

from __future__ import annotations

import itertools

import pytest

from aa_deploy.calibration.budget import (
    HELD_FLOOR,
    MIN_EPOCHS,
    OPENING_SHARE,
    OUTPUT_SHARE,
    START_FLOOR,
    START_LEAST,
    Rates,
    Sizes,
    Work,
    held_out_size,
    plan_time,
    range_seconds,
    replan_after_start,
    start_images,
    start_seconds,
)

DEFAULTS = Sizes(start_images=256, train_images=830, probe_images=92, range_steps=12)
# EfficientNet-Lite0 at 224 px on two CPU cores, about: canvas views (8 teacher passes per target), 1 student view
LITE0 = Rates(teacher=0.02, student=0.02, step=0.08, figures=30.0)
CANVAS = Work(target_passes=8, step_teacher_passes=0, batch=64, max_epochs=45, distill=True)
SHIFTS = Work(target_passes=0, step_teacher_passes=4, batch=64, max_epochs=45, distill=True)


def _total(plan) -> float:
    return plan.spent + sum(plan.seconds.values())


def test_without_a_limit_every_step_runs_at_its_default_size():
    assert plan_time(None, 100.0, LITE0, DEFAULTS, CANVAS).sizes == DEFAULTS
    assert plan_time(600.0, 100.0, None, DEFAULTS, CANVAS).sizes == DEFAULTS  # nothing measured: nothing to size
    plan = plan_time(1e6, 100.0, LITE0, DEFAULTS, CANVAS)
    assert plan.sizes == DEFAULTS and plan.epochs == CANVAS.max_epochs


@pytest.mark.parametrize("work", [CANVAS, SHIFTS], ids=["canvas", "shifts"])
def test_the_planned_steps_fit_the_limit(work):
    # Across limits from a few minutes to an hour and machines 10x apart: whenever distillation is planned,
    # the estimates of every step add up to no more than the limit, with at least MIN_EPOCHS epochs; the
    # sizes never exceed their defaults and shrink as the limit does.
    for minutes, speed, spent in itertools.product((3, 5, 10, 20, 40, 60), (0.3, 1.0, 3.0), (20.0, 120.0)):
        rates = Rates(*(speed * r for r in (LITE0.teacher, LITE0.student, LITE0.step, LITE0.figures)))
        plan = plan_time(60.0 * minutes, spent, rates, DEFAULTS, work)
        s = plan.sizes
        assert s.start_images <= DEFAULTS.start_images and s.train_images <= DEFAULTS.train_images
        if s.distill:
            assert _total(plan) <= 60.0 * minutes + 1e-6, (minutes, speed, spent, plan)
            assert plan.epochs >= MIN_EPOCHS and s.train_images >= work.batch
        longer = plan_time(60.0 * minutes * 2, spent, rates, DEFAULTS, work).sizes
        assert longer.train_images >= s.train_images and longer.start_images >= s.start_images


def test_a_short_limit_cuts_the_start_the_range_test_and_the_training_images():
    plan = plan_time(8 * 60.0, 120.0, LITE0, DEFAULTS, CANVAS)
    s = plan.sizes
    assert s.distill and s.train_images < DEFAULTS.train_images
    assert range_seconds(s.probe_images, s.range_steps, LITE0, CANVAS) < range_seconds(
        DEFAULTS.probe_images, DEFAULTS.range_steps, LITE0, CANVAS
    )
    assert plan.seconds["start"] == start_seconds(s.start_images, LITE0) <= 0.2 * (8 * 60.0 - 120.0)


def test_a_limit_too_short_for_two_epochs_drops_distillation_before_it_starts():
    plan = plan_time(4 * 60.0, 120.0, LITE0, DEFAULTS, CANVAS)
    assert not plan.sizes.distill and plan.sizes.train_images == 0 and plan.epochs == 0
    assert set(plan.seconds) == {"start", "final figures"}
    gone = plan_time(1.0, 120.0, LITE0, DEFAULTS, CANVAS)  # spent before the plan: the smallest start
    assert not gone.sizes.distill and gone.sizes.start_images == START_LEAST
    # about 21 s left after the closing figures and the output's share: the start's fixed part (12 s here)
    # and 13 images fit, not the floor's 32; the limit first
    limit = 120.0 + LITE0.figures + 25.0
    left = limit * (1 - OUTPUT_SHARE) - 120.0 - LITE0.figures
    tight = plan_time(limit, 120.0, LITE0, DEFAULTS, CANVAS)
    assert START_LEAST < tight.sizes.start_images == start_images(left, LITE0) == 13 < START_FLOOR
    assert start_seconds(tight.sizes.start_images, LITE0) <= left < start_seconds(tight.sizes.start_images + 1, LITE0)


def test_the_closed_form_methods_give_the_start_all_the_time():
    work = Work(target_passes=0, step_teacher_passes=0, batch=64, max_epochs=45, distill=False)
    short = plan_time(3 * 60.0, 60.0, LITE0, DEFAULTS, work)
    assert not short.sizes.distill and START_FLOOR <= short.sizes.start_images < DEFAULTS.start_images
    assert start_seconds(short.sizes.start_images, LITE0) <= 2 * 60.0 - LITE0.figures
    assert plan_time(3600.0, 60.0, LITE0, DEFAULTS, work).sizes.start_images == DEFAULTS.start_images


def test_a_start_slower_than_planned_takes_its_overrun_from_the_training_images():
    plan = plan_time(8 * 60.0, 120.0, LITE0, DEFAULTS, CANVAS)
    on_time = replan_after_start(plan, 120.0 + plan.seconds["start"], LITE0, DEFAULTS, CANVAS)
    late = replan_after_start(plan, 120.0 + 1.5 * plan.seconds["start"], LITE0, DEFAULTS, CANVAS)
    assert late.sizes.distill and late.sizes.train_images < on_time.sizes.train_images
    assert late.sizes.start_images == plan.sizes.start_images and late.seconds["start"] == 0.0
    assert _total(late) <= 8 * 60.0 + 1e-6
    assert replan_after_start(plan_time(None, 0.0, None, DEFAULTS, CANVAS), 1e9, None, DEFAULTS, CANVAS).sizes == (
        DEFAULTS
    )


def test_the_closing_figures_are_reserved_at_their_own_cost():
    # Canvas views score the diagonal only at the end: the closing figures cost more than an epoch's scoring.
    closing = Rates(LITE0.teacher, LITE0.student, LITE0.step, figures=10.0, final=60.0)
    plan = plan_time(15 * 60.0, 120.0, closing, DEFAULTS, CANVAS)
    assert plan.seconds["final figures"] == 60.0 and _total(plan) <= 15 * 60.0 + 1e-6
    cheaper = plan_time(15 * 60.0, 120.0, Rates(LITE0.teacher, LITE0.student, LITE0.step, 60.0), DEFAULTS, CANVAS)
    assert plan.epochs >= cheaper.epochs  # epochs scored at 10 s, not at the closing 60 s


def test_the_held_out_slice_is_cut_to_what_a_quarter_of_the_limit_holds():
    assert held_out_size(None, 0.0, 260, 10.0) == 260  # no limit: every held-out image
    assert held_out_size(600.0, 0.0, 260, 0.1) == 260  # fast: all of them fit
    fit = held_out_size(600.0, 60.0, 260, 2.0)
    assert fit == int(OPENING_SHARE * 540 // 2.0) and fit * 2.0 <= OPENING_SHARE * 540
    assert held_out_size(60.0, 0.0, 260, 30.0) == HELD_FLOOR  # never fewer than the floor
    assert held_out_size(60.0, 100.0, HELD_FLOOR - 2, 30.0) == HELD_FLOOR - 2  # nor more than there are
    slower = LITE0.scaled(2.0)
    assert (slower.teacher, slower.student, slower.step, slower.figures) == (0.04, 0.04, 0.16, LITE0.figures)
