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


def calibrate(model, teacher, images, output, *, progress=None, check=True, **options):
    """`aa_deploy.calibration.calibrate.calibrate` with its configuration as keywords: each goes to the
    record (Data, Training or Compute) that has a field of its name."""
    from dataclasses import fields

    from aa_deploy.calibration import calibrate as module

    records = (module.Data, module.Training, module.Compute)
    names = [{f.name for f in fields(record)} for record in records]
    unknown = set(options) - set().union(*names)
    assert not unknown, f"no configuration field named {sorted(unknown)}"
    data, training, compute = (
        record(**({"images": images} if record is module.Data else {}), **{k: v for k, v in options.items() if k in n})
        for record, n in zip(records, names)
    )
    return module.calibrate(model, teacher, data, output, training, compute, progress=progress, check=check)
