"""What `tune` found, as the reader and a release pipeline take it: the frontier table, the plot's rows, the
requirements checked on the choice."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from rich.console import Group
from rich.table import Table

from aa_deploy.common.errors import InputError
from aa_deploy.consistency.gate import Outcome, Requirement, judge
from aa_deploy.consistency.plots import plot_frontier
from aa_deploy.tune.rule import Delta, Row
from aa_deploy.tune.search import Tuned


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def _delta(d: Delta | None, first: bool) -> str:
    return "" if d is None or first else d.text()


def _accuracy(r: Row) -> str:
    return "" if r.accuracy is None else f"{_pct(r.accuracy)} ({r.accuracy_images})"


def table(tuned: Tuned) -> Table:
    """The frontier: every candidate, its cost, and its figures against the original where measured (accuracy
    with the images it is over)."""
    rule = tuned.rule
    out = Table(title=f"candidates on {len(tuned.split.selection)} selection images", title_justify="left")
    columns = (
        "candidate", "multiply-adds", "latency", f"{rule.accuracy} % (images)", "vs original (95% CI)",
        f"{rule.protocol} %", "vs original (95% CI)", "one-pixel %", "vs original (95% CI)", "s", "",
    )  # fmt: skip
    for column in columns:
        out.add_column(column)
    for i, r in enumerate(tuned.rows):
        macs = "" if r.macs_ratio is None else f"x{r.macs_ratio:.2f}"
        latency = "" if r.latency_ratio is None else f"x{r.latency_ratio:.2f}"
        mark = "chosen" if r is tuned.chosen else (r.reason or r.status if r.status != "measured" else "")
        out.add_row(
            r.name, macs, latency, _accuracy(r), _delta(r.accuracy_delta, i == 0), _pct(r.consistency),
            _delta(r.consistency_delta, i == 0), _pct(r.one_pixel), _delta(r.one_pixel_delta, i == 0),
            f"{r.seconds:.0f}" if r.status == "measured" else "", mark,
            style="bold" if r is tuned.chosen else None,
        )  # fmt: skip
    return out


def summary(tuned: Tuned) -> str:
    """One line: the split, the rule, the time taken."""
    s = tuned.split
    return (
        f"images: {len(s.calibration)} to calibrate, {len(s.selection)} to select (seed {s.seed}); "
        f"rule: {tuned.rule.describe()}; {tuned.seconds / 60:.1f} min"
    )


def verdict(tuned: Tuned) -> str:
    """One line: the choice and why, or that nothing qualifies."""
    if tuned.chosen is None:
        return "no candidate qualifies under the rule above: none is written (the table is the frontier to choose from)"
    c = tuned.chosen
    return (
        f"chosen: {c.name} (multiply-adds x{c.macs_ratio:.2f}): {tuned.rule.protocol} consistency "
        f"{c.consistency_delta.text()}, one-pixel {c.one_pixel_delta.text()} against the original on the "
        f"selection images, {tuned.rule.accuracy} {c.accuracy_delta.text()} points on {c.accuracy_images}"
    )


@dataclass(frozen=True)
class Frontier:
    """A finished tune as it prints: the frontier table, the split, rule and time on one line, the choice
    (or that none qualifies) on another."""

    tuned: Tuned

    def __rich__(self) -> Group:
        return Group(table(self.tuned), summary(self.tuned), verdict(self.tuned))


def payload(tuned: Tuned, model: str, outcomes: list[Outcome]) -> dict:
    """What `tune --report` writes (schema aa-deploy.tune/1): the search's record and each requirement's outcome."""
    return {
        "schema": "aa-deploy.tune/1",
        "model": model,
        **tuned.record(),
        "requirements": [o.as_dict() for o in outcomes],
    }


def _pair(d: Delta | None):
    return None if d is None else (d.delta, (d.low, d.high))


def plot(tuned: Tuned, path: str | os.PathLike, title: str) -> None:
    """The frontier plot (`consistency.plots.plot_frontier`) of the measured candidates."""
    rows = [
        {"name": r.name, "macs_ratio": r.macs_ratio, "consistency": _pair(r.consistency_delta),
         "one-pixel": _pair(r.one_pixel_delta)}
        for r in tuned.rows[1:] if r.status == "measured"
    ]  # fmt: skip
    panels = (("consistency", f"{tuned.rule.protocol} consistency"), ("one-pixel", "one-pixel consistency"))
    plot_frontier({title: rows}, path, title, panels)


def _measured(requirement: Requirement, tuned: Tuned, row: Row) -> Delta:
    """The figure of the chosen `row` a requirement names."""
    metric = requirement.metric
    if metric == "top1":
        if tuned.rule.accuracy != "top-1":
            raise InputError(f"--require {requirement.text}: top-1 needs labels (--labels, or a folder per class)")
        return row.accuracy_delta
    if metric in ("consistency", tuned.rule.protocol):
        return row.consistency_delta
    if metric == "one-pixel":
        return row.one_pixel_delta
    raise InputError(
        f"--require {requirement.text}: tune measures top1, consistency ({tuned.rule.protocol}) and one-pixel"
    )


def check(requirements: list[Requirement], tuned: Tuned) -> list[Outcome]:
    """Each requirement on the chosen model's paired differences; where nothing was chosen, each fails."""
    if tuned.chosen is None:
        return [Outcome(r.text, "no candidate qualifies", math.nan, (math.nan, math.nan), False) for r in requirements]
    found = []
    for r in requirements:
        d = _measured(r, tuned, tuned.chosen)
        found.append(judge(r, tuned.chosen.name, d.delta, (d.low, d.high)))
    return found
