"""How calibration's progress prints beyond the bars (`calibrate`, `convert --calibrate`): the time plan,
the CPU threads fitted, the epochs expected, each epoch's held-out figures."""

from __future__ import annotations

from rich.console import Console

from aa_deploy.calibration.calibrate import Planned, ThreadsFitted
from aa_deploy.calibration.distill import Epoch, EpochsPlanned
from aa_deploy.calibration.report import pct


def show(console: Console, event: object) -> None:
    """Print one of calibrate's events: the time plan (under a time limit), the threads fitted, the epochs
    expected, each epoch's figures; other events are the bars'."""
    if isinstance(event, Planned):
        if event.plan.limit is not None:
            console.print(time_plan(event.plan, event.after_start, event.remeasured))
    elif isinstance(event, ThreadsFitted):
        fit = event.fit
        timed = ", ".join(f"{n} thread{'s' if n > 1 else ''} {1000 * t:.0f} ms" for n, t in fit.seconds.items())
        console.print(
            f"  {fit.threads} CPU thread{'s' if fit.threads > 1 else ''} from here, not {fit.previous}: other "
            f"processes keep {fit.busy:.1f} cores busy (the student's forward on a few images: {timed})"
        )
    elif isinstance(event, EpochsPlanned):
        console.print(
            f"  expected: {event.epochs} epochs of about {event.epoch_seconds:.0f} s, "
            f"{event.seconds / 60:.1f} minutes of distillation (from the range test's steps)"
        )
    elif isinstance(event, Epoch):
        if event.epoch == 0:
            console.print(f"  learning rate {event.lr:g}")
        loss = "" if event.loss is None else f", loss {event.loss:.3f}"
        of = f" of {event.planned}" if event.planned is not None else ""
        f = event.figures
        consistency = " / ".join(pct(value) for value in f.consistency.values())
        console.print(
            f"  epoch {event.epoch}{of}: held-out fidelity {100 * f.fidelity:.1f}%, consistency {consistency}, "
            f"score {f.score:.3f}{loss}"
        )


def time_plan(plan, after_start: bool = False, remeasured: float | None = None) -> str:
    """The plan's one line: how the limit's minutes will be spent, step by step."""
    sizes, seconds = plan.sizes, plan.seconds

    def minutes(step: str) -> str:
        return f"{seconds[step] / 60:.1f} min"

    if after_start:
        head = "  replanned after the start"
    elif remeasured is not None:
        head = f"  replanned after the opening figures (x{remeasured:.2f} their estimate)"
    else:
        head = f"  time limit {plan.limit / 60:g} min"
    first = after_start or remeasured is not None
    parts = [f"{plan.spent / 60:.1f} min gone" if first else f"{plan.spent / 60:.1f} min spent measuring"]
    if "held-out figures" in seconds:
        parts.append(f"held-out figures on {plan.held_out} images ~{minutes('held-out figures')}")
    if not after_start:
        parts.append(f"closed-form start on {sizes.start_images} images ~{minutes('start')}")
    if sizes.distill:
        what = "decoding and teacher targets" if plan.targets else "decoding"
        parts.append(f"{what} for {sizes.train_images} training images ~{minutes('targets')}")
        parts.append(
            f"range test ({sizes.probe_images} images, {sizes.range_steps} steps a rate) ~{minutes('range test')}"
        )
        parts.append(
            f"distillation on {sizes.train_images} images ~{minutes('distillation')} (about {plan.epochs} epochs)"
        )
    else:
        parts.append("no distillation (not two epochs of one batch fit: the start is the result)")
    parts.append(f"final figures ~{minutes('final figures')}")
    return f"{head}: " + "; ".join(parts)
