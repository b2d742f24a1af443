"""How many threads torch's intra-op pool runs with on the CPU, chosen by timing the work itself.

torch starts one thread per core. Beside another CPU-bound job the threads wait on each other at every
op's barrier, and fewer threads than cores are faster: EfficientNet-Lite0's forward on two cores took
142 ms an image with 2 threads beside a two-thread torch job and 52 ms with 1, and 68 ms against 29 ms
beside a one-thread Python loop; alone, 2 threads took 29 ms and 1 took 35. `fit_threads` times a run
at each candidate count and keeps the fastest, the most threads unless another count is FEWER_GAIN
faster. Sums are split differently across threads, so a run that must be reproducible bit for bit
keeps the count it was given; `calibrate` fits only under a time limit.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

MOST = torch.get_num_threads()  # what torch chose at import: the cores, or OMP_NUM_THREADS
FEWER_GAIN = 1.15  # a smaller count must be this many times faster than the most threads to be kept
TIMED = 0.1  # seconds each count is timed for at least: a run of a few ms is repeated


@dataclass(frozen=True)
class ThreadFit:
    """The count kept, the one before, and one run's seconds at each count tried."""

    threads: int
    previous: int
    seconds: dict[int, float]

    @property
    def speed_up(self) -> float:
        """How many times faster the run is at the kept count than at the one before (1.0 when it was
        not timed)."""
        before = self.seconds.get(self.previous)
        return 1.0 if before is None else before / self.seconds[self.threads]


def candidates(most: int) -> list[int]:
    """The counts tried: all the threads, half of them, one."""
    return sorted({most, max(1, most // 2), 1}, reverse=True)


def fit_threads(run: Callable[[], object], most: int = MOST) -> ThreadFit:
    """Time `run` (after one warm-up run, then as many runs as fill TIMED seconds) at each candidate count up
    to `most`, set torch to the fastest and return one run's seconds at each."""
    previous = torch.get_num_threads()
    seconds: dict[int, float] = {}
    for count in candidates(most):
        torch.set_num_threads(count)
        run()
        runs, began = 0, time.perf_counter()
        while not runs or time.perf_counter() - began < TIMED:
            run()
            runs += 1
        seconds[count] = (time.perf_counter() - began) / runs
    fastest = min(seconds, key=seconds.__getitem__)
    kept = most if seconds[most] <= FEWER_GAIN * seconds[fastest] else fastest
    torch.set_num_threads(kept)
    return ThreadFit(kept, previous, seconds)
