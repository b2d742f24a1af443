"""aa_deploy/common/threads.py: one torch thread per core the other processes leave free, counted from /proc/stat."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import aa_deploy.common.threads as threads_module
from aa_deploy.common.threads import busy_elsewhere, fit_threads, restores_threads


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _run_taking(seconds_by_count: dict[int, float]):
    """A run whose duration depends on the thread count it runs at, as a torch op's does."""
    return lambda: time.sleep(seconds_by_count[torch.get_num_threads()])


@pytest.mark.parametrize("busy,kept", [(1.9, 1), (1.0, 1), (0.6, 1), (0.4, 2), (0.0, 2), (None, 2)], ids=str)
def test_one_thread_per_core_left_free(threads, monkeypatch, busy, kept):
    monkeypatch.setattr(threads_module, "busy_elsewhere", lambda: busy)
    monkeypatch.setattr(threads_module.os, "sched_getaffinity", lambda pid: {0, 1})
    torch.set_num_threads(2)
    fit = fit_threads(_run_taking({2: 0.03, 1: 0.01}), most=2)
    assert fit.threads == kept == torch.get_num_threads() and fit.previous == 2 and fit.busy == busy
    if kept == 1:  # timed at both counts: the change's speed-up
        assert set(fit.seconds) == {1, 2} and fit.speed_up == pytest.approx(3.0, rel=0.3)
    else:
        assert set(fit.seconds) == {2} and fit.speed_up == 1.0


def test_never_more_threads_than_torch_started_with(threads, monkeypatch):
    monkeypatch.setattr(threads_module, "busy_elsewhere", lambda: 0.0)
    monkeypatch.setattr(threads_module.os, "sched_getaffinity", lambda pid: set(range(16)))
    torch.set_num_threads(1)
    assert fit_threads(lambda: None, most=4).threads == 4


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="counts the other processes' load from /proc/stat (Linux)")
def test_a_busy_process_beside_this_one_is_counted():
    job = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time() + 5\nwhile time.time() < t: pass"])
    try:
        time.sleep(0.5)
        assert busy_elsewhere(1.0) > 0.6  # one core kept busy by the loop (less what the scheduler lends others)
    finally:
        job.kill()
        job.wait()


def test_a_fitting_function_leaves_the_threads_as_it_found_them(threads):
    @restores_threads
    def fitting(fail: bool):
        torch.set_num_threads(1)
        if fail:
            raise ValueError("ended early")
        return "done"

    torch.set_num_threads(2)
    assert fitting(False) == "done" and torch.get_num_threads() == 2
    with pytest.raises(ValueError):
        fitting(True)
    assert torch.get_num_threads() == 2
