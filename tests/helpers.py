"""Helpers shared by the test modules."""

from __future__ import annotations

import subprocess
import sys

import numpy as np


def cli(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python -m aa_deploy ARGS` (the installed CLI) and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "aa_deploy", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


def factor_spread(after, before) -> float:
    """How far `after` is from `before` times one factor per output channel (dim 0): the largest
    deviation of the element-wise ratio from each channel's first (0 for a pure rescale)."""
    ratio = (np.asarray(after, np.float64) / np.asarray(before, np.float64)).reshape(len(before), -1)
    return float(np.abs(ratio - ratio[:, :1]).max())
