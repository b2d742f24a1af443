"""What calibration reports when it ends: the held-out figures of the teacher, the converted and the
calibrated model, the verdict by paired interval, the advice where it is not more consistent, and what
the run took. `CalibrationReport` prints as that (rich); `calibrate` and `convert --calibrate` print it."""

from __future__ import annotations

import os
from dataclasses import dataclass

from rich.console import Group
from rich.table import Table

from aa_deploy.calibration.calibrate import CalibrationResult


def pct(value) -> str:
    """A share (0..1) as a percentage to one decimal; "-" for none."""
    return "-" if value is None else f"{100 * value:.1f}"


def _word(lo: float, hi: float) -> str:
    return "BETTER" if lo > 0 else "WORSE" if hi < 0 else "not resolved"


def verdict(result: CalibrationResult, who: str = "the original") -> str:
    """One clause per consistency protocol (better / not resolved / worse, by the paired interval over
    the held-out images) and the agreement with the teacher's answers (`who`; no labels: no top-1)."""
    parts = [
        f"{name} consistency {_word(*d.ci95)} ({100 * d.delta:+.1f}, {100 * d.ci95[0]:+.1f} to {100 * d.ci95[1]:+.1f})"
        for name, d in result.versus_teacher.items()
    ]
    if result.after.fidelity is not None:
        parts.append(f"answers as {who}'s on {100 * result.after.fidelity:.1f} % of shifted views")
    return "; ".join(parts)


@dataclass(frozen=True)
class CalibrationReport:
    """A finished calibration as it prints: `result`, written to `output`."""

    result: CalibrationResult
    output: str | os.PathLike

    @property
    def who(self) -> str:
        """The teacher's name in the report: the original, or the dense teacher (a dense conversion of it)."""
        return "the dense teacher" if self.result.teacher_dense else "the original"

    def __rich__(self) -> Group:
        result, who = self.result, self.who
        lines: list = [
            self.figures(),
            f"fidelity: top-1 agreement with {who} averaged over shifts of each image; agreement: with its answer "
            "on the image itself",
        ]
        if result.versus_teacher:
            lines.append(
                f"verdict on {result.held_out} held-out images, calibrated against {who}: {verdict(result, who)}"
            )
        if any(d.ci95[0] <= 0 for d in result.versus_teacher.values()):
            lines.append(
                f"[yellow]not more consistent than {who} here. Measure on other images (aa-deploy consistency); "
                "more calibration images usually help"
                + (
                    "[/yellow]"
                    if self.result.dense
                    else "; dense sampling needs no training: aa-deploy convert ORIGINAL --dense-last 2 --filter none "
                    "(exact, at the compute aa-deploy inspect states)[/yellow]"
                )
            )
        s = result.start
        lines.append(
            f"start ({s.name}): the teacher's layers matched by {s.matched_by} for all {s.convs} trainable convs; "
            f"{s.refit} layers refit by least squares, {s.rescaled} rescaled"
        )
        lines.append(
            f"device {result.device}, batches {result.batch[0]} (evaluation) / {result.batch[1]} (training), "
            f"{result.activation_mb:.1f} MB of activations per image"
        )
        extra = f", lr {result.lr:g}, kept epoch {result.kept_epoch} of {result.epochs}" if result.lr else ""
        if result.plan is not None:
            extra += (
                f"; the time limit used {result.trained_on} of its {result.images - result.held_out} training images"
            )
        lines.append(f"calibrated on {result.images} images in {result.seconds:.0f} s{extra}; wrote {self.output}")
        return Group(*lines)

    def figures(self) -> Table:
        """The held-out figures of the teacher, the converted and the calibrated model."""
        result = self.result
        chose = (
            " (held out from training; they also chose the learning rate and whether to keep the schedule's end, "
            "so these figures lean optimistic: measure on other images with aa-deploy consistency)"
            if result.method == "distill"
            else " (held out from the refit; they chose nothing)"
        )
        table = Table(
            title=f"calibration ({result.method}) on {result.held_out} held-out images{chose}", title_justify="left"
        )
        measured = list(result.after.consistency)
        for column in ("model", "fidelity %", "agreement %", *(f"consistency % ({name})" for name in measured)):
            table.add_column(column)
        for name, row in (
            (self.who.removeprefix("the "), result.teacher),
            ("converted", result.before),
            ("calibrated", result.after),
        ):
            table.add_row(name, pct(row.fidelity), pct(row.agreement), *(pct(row.consistency.get(m)) for m in measured))
        return table
