"""Blur filters: the one place that knows the taps.

The ONNX pass, the PyTorch twin and the INT8 path all ask this module, so a filter means the same
numbers everywhere.

Named filters are the binomial rows of Zhang (2019): ``rect`` [1, 1], ``triangle`` [1, 2, 1],
``binomial`` [1, 4, 6, 4, 1]; ``size`` N picks the binomial row of N taps (1..7). ``none`` is the
1-tap identity: no blur is inserted (what `--dense-last` alone asks for).

Widening rule for stride s > 2: a binomial row of N taps is the box [1, 1] convolved with itself
N - 1 times. For stride s each [1, 1] factor becomes a box of s ones, so the row becomes
box_s^(N-1) with (N - 1)(s - 1) + 1 taps. For s = 2 this is the row itself; it keeps the filter's
shape (rect stays a box, triangle stays a triangle) while scaling its cut-off to the new Nyquist
frequency pi / s. Example: triangle at stride 4 is [1, 2, 3, 4, 3, 2, 1] / 16.
"""

from __future__ import annotations

from functools import cache

import numpy as np

from aa_deploy.common.errors import SettingError

NAMED_SIZES = {"none": 1, "rect": 2, "triangle": 3, "binomial": 5}
MAX_SIZE = 7


def filter_size(name: str | None = None, size: int | None = None) -> int:
    """Number of taps at stride 2 for a named filter or an explicit binomial size."""
    if size is not None:
        if not 1 <= size <= MAX_SIZE:
            raise SettingError(
                "filter size", f"must be 1..{MAX_SIZE}", size, f"filter size must be 1..{MAX_SIZE}, not {size}"
            )
        return size
    if name not in NAMED_SIZES:
        raise SettingError(
            "filter", "must be a named filter", name, f"unknown filter {name!r}; choose one of {', '.join(NAMED_SIZES)}"
        )
    return NAMED_SIZES[name]


@cache
def _taps(size: int, stride: int) -> tuple[float, ...]:
    box = np.ones(max(stride, 2), dtype=np.float64)
    row = np.ones(1, dtype=np.float64)
    for _ in range(size - 1):
        row = np.convolve(row, box)
    return tuple(float(v) for v in row / row.sum())


def taps_1d(size: int, stride: int) -> tuple[float, ...]:
    """Normalized 1-D taps of the binomial row of `size` taps, widened for `stride` (see module doc)."""
    if stride < 1:
        raise SettingError("stride", "must be >= 1", stride, f"stride must be >= 1, not {stride}")
    return _taps(size, stride)


def padding(k: int) -> tuple[int, int]:
    """Left/right padding that keeps a k-tap blur centred and the map's size (Zhang's convention)."""
    return (k - 1) // 2, k // 2


def kernel(taps_per_axis: list[tuple[float, ...]], dtype=np.float32) -> np.ndarray:
    """Outer product of per-axis taps: the separable n-D kernel (sums to one)."""
    out = np.ones((), dtype=np.float64)
    for taps in taps_per_axis:
        out = np.multiply.outer(out, np.asarray(taps, dtype=np.float64))
    return out.astype(dtype)
