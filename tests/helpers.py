"""Helpers shared by the test modules."""

from __future__ import annotations

import subprocess
import sys


def cli(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `python -m aa_deploy ARGS` (the installed CLI) and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "aa_deploy", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )
