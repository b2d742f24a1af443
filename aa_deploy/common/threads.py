"""How many threads torch's intra-op pool runs with on the CPU: the cores other processes leave free.

torch starts one thread per core. Beside another CPU-bound job its threads wait on each other at every
op's barrier, and fewer threads than cores are faster: EfficientNet-Lite0's forward on two cores took
142 ms an image with 2 threads beside a two-thread torch job and 52 ms with 1, and 68 ms against 29 ms
beside a one-thread Python loop; alone, 2 threads took 29 ms and 1 took 35. Timing each count is no
guide there: the barrier's cost depends on how the scheduler interleaves the two jobs at that moment
(the same two counts timed 1,456 against 196 ms, then 157 against 158 ms a minute later, while the
training steps after ran as slowly as ever at 2). So `fit_threads` counts what the other processes
use: the busy time of this process's cores in /proc/stat (Linux) over WINDOW seconds while this process
sleeps, and keeps one thread per core they leave free (at least one, at most the threads torch started
with). Where /proc/stat cannot be read the threads stay as they are. Sums are split differently across
threads, so a run that must be reproducible bit for bit keeps the count it was given; `calibrate` fits
only under a time limit, and leaves the count as it found it (`restores_threads`).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

MOST = torch.get_num_threads()  # what torch chose at import: the cores, or OMP_NUM_THREADS
WINDOW = 0.3  # seconds the other processes' load is counted over
TIMED = 0.1  # seconds a run is timed for at least: a run of a few ms is repeated


@dataclass(frozen=True)
class ThreadFit:
    """The count kept, the one before, the cores other processes kept busy (None: not known), and one run's
    seconds at the count kept (and at the one before, where it changed)."""

    threads: int
    previous: int
    busy: float | None
    seconds: dict[int, float]

    @property
    def speed_up(self) -> float:
        """How many times faster the run is at the count kept than at the one before (1.0 when it is the same)."""
        before = self.seconds.get(self.previous)
        return 1.0 if before is None else before / self.seconds[self.threads]


def busy_elsewhere(window: float = WINDOW) -> float | None:
    """Cores of this process's CPU set that other processes kept busy over `window` seconds of this one
    sleeping (None where /proc/stat cannot be read)."""

    def busy() -> float:
        cpus = {f"cpu{c}" for c in os.sched_getaffinity(0)}
        total = 0
        for line in Path("/proc/stat").read_text().splitlines():
            name, *fields = line.split()
            if name in cpus:
                ticks = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
                total += sum(ticks) - ticks[3] - ticks[4]
        return total / os.sysconf("SC_CLK_TCK")

    try:
        before, own = busy(), os.times()
        time.sleep(window)
        after, mine = busy(), os.times()
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    ours = (mine.user + mine.system) - (own.user + own.system)
    return max(0.0, after - before - ours) / window


def timed(run: Callable[[], object]) -> float:
    """One run's seconds, after a warm-up run, averaged over as many runs as fill TIMED seconds."""
    run()
    runs, began = 0, time.perf_counter()
    while not runs or time.perf_counter() - began < TIMED:
        run()
        runs += 1
    return (time.perf_counter() - began) / runs


def fit_threads(run: Callable[[], object], most: int = MOST) -> ThreadFit:
    """Set torch to one thread per core the other processes leave free (see the module's docstring) and time
    `run` there, and at the count before where it changed."""
    previous = torch.get_num_threads()
    others = busy_elsewhere()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else most
    kept = previous if others is None else max(1, min(most, int(cores - others + 0.5)))
    seconds = {}
    if kept != previous:
        seconds[previous] = timed(run)
    torch.set_num_threads(kept)
    seconds[kept] = timed(run)
    return ThreadFit(kept, previous, others, seconds)


def restores_threads(function: Callable) -> Callable:
    """`function`, leaving torch's thread count as it found it however it ends (a fit is the run's own)."""

    @functools.wraps(function)
    def run(*args, **kwargs):
        count = torch.get_num_threads()
        try:
            return function(*args, **kwargs)
        finally:
            torch.set_num_threads(count)

    return run
