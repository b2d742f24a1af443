"""Is a consistency gain real? Intervals that resample images, not shift pairs.

The pairs of one image are not independent draws: a model that flips on an image flips on many of
its pairs, and more passes shrink a per-pair interval towards zero while the uncertainty from
having only these images stays. So intervals here come from a bootstrap over images: of one
model's consistency, and of the difference between two models measured on the same images and
the same shifts (a paired comparison: image-to-image variation cancels).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

RESAMPLES = 10_000


def bootstrap_ci(
    values: np.ndarray, resamples: int = RESAMPLES, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile interval (95 % by default) of the mean of `values` (one per image), images resampled."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return (0.0, 1.0)
    # Resampling n images with replacement = drawing how many times each distinct value is picked,
    # Multinomial(n, its share): the same distribution, and cheap, since per-image agreement rates
    # take few distinct values (passes + 1 for random pairs).
    levels, counts = np.unique(values, return_counts=True)
    picks = np.random.default_rng(seed).multinomial(len(values), counts / len(values), size=resamples)
    means = picks @ levels / len(values)
    tail = 50.0 * (1.0 - level)
    lo, hi = np.percentile(means, [tail, 100.0 - tail])
    return (float(lo), float(hi))


@dataclass(frozen=True)
class PairedDelta:
    """`other` minus `base`: the difference of their consistencies and its 95 % interval."""

    delta: float
    ci95: tuple[float, float]
    images: int

    @property
    def resolved(self) -> bool:
        """True when the interval excludes zero: the sign of the difference is supported by these images."""
        return self.ci95[0] > 0 or self.ci95[1] < 0

    def as_dict(self) -> dict:
        return asdict(self) | {"resolved": self.resolved}


def paired_difference(base, other, resamples: int = RESAMPLES, seed: int = 0) -> PairedDelta:
    """Consistency of `other` minus that of `base` (ConsistencyResults from the same images and shifts)."""
    a, b = np.asarray(base.per_image, np.float64), np.asarray(other.per_image, np.float64)
    if len(a) == 0 or len(a) != len(b):
        raise ValueError(f"a paired comparison needs per-image results on the same images ({len(a)} vs {len(b)})")
    diff = b - a
    return PairedDelta(float(other.consistency - base.consistency), bootstrap_ci(diff, resamples, seed), len(diff))
