"""aa_deploy/threads.py: the CPU threads kept are the fastest count timed, the most unless fewer are clearly faster."""

from __future__ import annotations

import time

import pytest
import torch

from aa_deploy.threads import FEWER_GAIN, candidates, fit_threads


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _run_taking(seconds_by_count: dict[int, float]):
    """A run whose duration depends on the thread count it runs at, as a torch op's does."""
    return lambda: time.sleep(seconds_by_count[torch.get_num_threads()])


def test_the_counts_tried_are_all_half_and_one():
    assert candidates(16) == [16, 8, 1] and candidates(2) == [2, 1] and candidates(1) == [1]


def test_fewer_threads_are_kept_when_clearly_faster(threads):
    # beside another job: one thread three times faster than two
    fit = fit_threads(_run_taking({2: 0.03, 1: 0.01}), most=2)
    assert fit.threads == 1 == torch.get_num_threads() and set(fit.seconds) == {1, 2}
    assert fit.seconds[2] > fit.seconds[1] >= 0.01 and fit.speed_up == pytest.approx(fit.seconds[2] / fit.seconds[1])


def test_the_most_threads_are_kept_unless_another_count_gains_enough(threads):
    torch.set_num_threads(1)
    # alone: one thread a little faster than two, within the margin noise leaves
    fit = fit_threads(_run_taking({2: 0.021, 1: 0.02}), most=2)
    assert fit.threads == 2 == torch.get_num_threads() and fit.previous == 1
    fit = fit_threads(_run_taking({4: 0.03, 2: 0.01, 1: 0.02}), most=4)
    assert fit.threads == 2  # the fastest, in the middle
    fit = fit_threads(_run_taking({2: 0.02 * FEWER_GAIN * 1.3, 1: 0.02}), most=2)
    assert fit.threads == 1  # just past the margin
