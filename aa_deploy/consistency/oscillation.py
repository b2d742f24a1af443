"""The paper's plot as one number: how far the probability of the correct class swings as the image
shifts diagonally, pixel by pixel, over one period of the network's total stride.

A network that subsamples by S without a low-pass filter computes a function of the input that
repeats with period S under shifts, and in between it swings: the mean (over images) probability of
the correct class, as a function of the diagonal shift d, oscillates with period S. Its peak-to-peak
over one period (d = 0..S) is the amplitude; a shift-invariant network has none. The straight line
through the period's two ends is removed first: shifting by whole periods still changes the image at
its border (a circular roll's seam, a crop's new content), a trend that is no aliasing. The interval
comes from resampling images (the same resamples for both models of a paired difference).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from aa_deploy.consistency.protocols import ConsistencyResult

RESAMPLES = 2000


@dataclass(frozen=True)
class Oscillation:
    amplitude: float  # peak-to-peak of the mean correct-class probability over one period
    ci95: tuple[float, float]
    period: int
    images: int

    def as_dict(self) -> dict:
        return asdict(self)


def correct_probabilities(result: ConsistencyResult, period: int) -> np.ndarray:
    """images x (period + 1): each image's probability of its correct class at diagonal shifts 0..period
    (a diagonal result measured with labels, offsets from 0)."""
    curve = result.curve or {}
    if "correct_probability" not in curve:
        raise ValueError("the oscillation needs a diagonal result measured with labels")
    offsets = curve["offset"]
    if offsets[0] != 0 or len(offsets) < period + 1:
        raise ValueError(f"the oscillation over a period of {period} px needs diagonal shifts 0..{period}")
    return np.asarray(curve["correct_probability"], np.float64)[:, : period + 1]


def _peak_to_peak(curves: np.ndarray) -> np.ndarray:
    """Peak-to-peak over the last axis (shifts 0..S) of the mean over the second-to-last (images), after
    removing the straight line through its two ends."""
    mean = curves.mean(axis=-2)
    t = np.linspace(0.0, 1.0, mean.shape[-1])
    rest = mean - (mean[..., :1] + (mean[..., -1:] - mean[..., :1]) * t)
    return rest.max(axis=-1) - rest.min(axis=-1)


def _resamples(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def oscillation(result: ConsistencyResult, period: int, resamples: int = RESAMPLES, seed: int = 0) -> Oscillation:
    """The amplitude of `result`'s mean correct-class curve over one period, with its 95 % interval."""
    p = correct_probabilities(result, period)
    boot = _peak_to_peak(p[_resamples(len(p), resamples, seed)])
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return Oscillation(float(_peak_to_peak(p)), (float(lo), float(hi)), period, len(p))


def paired_oscillation(
    base: ConsistencyResult, other: ConsistencyResult, period: int, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, tuple[float, float]]:
    """`other`'s amplitude minus `base`'s (the same images and shifts) and its 95 % interval, both
    recomputed on each resample of images."""
    a, b = correct_probabilities(base, period), correct_probabilities(other, period)
    if a.shape != b.shape:
        raise ValueError(f"a paired comparison needs the same images and shifts ({a.shape} vs {b.shape})")
    index = _resamples(len(a), resamples, seed)
    boot = _peak_to_peak(b[index]) - _peak_to_peak(a[index])
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return float(_peak_to_peak(b) - _peak_to_peak(a)), (float(lo), float(hi))
