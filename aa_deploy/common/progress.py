"""How long-running steps report progress: one callable, `Progress`, receiving events.

Every step that counts through work (decoding images, refitting layers, teacher targets, views of a
consistency protocol, calibration batches, sites probed, models compared) reports `Advance(task, done,
total)`: `done` of `total` units of the task named as a person reads it. Steps with more to say report
their own typed events through the same callable (calibrate's time plan, its epochs); a receiver acts on
the kinds it knows and ignores the rest. The library never prints: the CLI turns the events into bars
and lines (`cli/common.progress_bars`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Advance:
    """`done` of `total` units of `task` are finished."""

    task: str
    done: int
    total: int


Progress = Callable[[object], None]


def silent(event: object) -> None:
    """The receiver of a caller that wants no progress."""


def counter(progress: Progress | None, task: str, total: int) -> Callable[[int], None]:
    """`advance(n)`: for a step that finishes its units in batches; reports the running count to `progress`."""
    report = progress or silent
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        report(Advance(task, done, total))

    return advance


def titled(progress: Progress | None, task: str) -> Progress:
    """`progress` with every `Advance` renamed to `task` (a step run once per model, reported per model)."""
    report = progress or silent
    return lambda event: report(replace(event, task=task) if isinstance(event, Advance) else event)
