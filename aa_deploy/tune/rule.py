"""How `tune` chooses, on figures it measured: the rule, the budget it applies it under, and each candidate's row.

Among the candidates within the budget whose accuracy loss against the original is within the tolerance
(the paired mean difference, in points, over every image the candidate did not learn from: the selection
part, and the calibration part too for a candidate not calibrated; top-1 with labels, else fidelity, top-1
agreement with the original's shift-averaged answer), the one whose paired consistency gain has the largest lower bound
(95 % interval over images) under the protocol the preprocessing implies; that bound must be above zero,
else nothing beats keeping the original. Ties: fewer multiply-adds, then the earlier candidate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from aa_deploy.common.errors import SettingError
from aa_deploy.consistency.paired import bootstrap_ci

MEASURED, OVER_BUDGET, OUT_OF_TIME, REFUSED = "measured", "over budget", "out of time", "refused"


@dataclass(frozen=True)
class Budget:
    """What the chosen model may cost against the original: multiply-adds and latency as ratios (None: no
    bound), the ONNX Runtime provider latency is timed on, and the seconds the whole search may take."""

    max_macs: float | None = None
    max_latency: float | None = None
    provider: str = "cpu"
    time_limit: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_macs", "max_latency"):
            value = getattr(self, name)
            if value is not None and not value >= 1.0:
                raise SettingError(name, "must be 1.0 or more (a ratio to the original's cost)", value)
        if self.time_limit is not None and not self.time_limit > 0:
            raise SettingError("time_limit", "must be positive", self.time_limit)

    def describe(self) -> str:
        parts = [f"multiply-adds <= x{self.max_macs:g}"] if self.max_macs else []
        parts += [f"latency ({self.provider}) <= x{self.max_latency:g}"] if self.max_latency else []
        return ", ".join(parts) or "no cost bound"


@dataclass(frozen=True)
class Delta:
    """A paired difference from the original in shares (0..1), with its 95 % interval over images."""

    delta: float
    low: float
    high: float

    @classmethod
    def of(cls, base: np.ndarray, other: np.ndarray) -> Delta:
        diff = np.asarray(other, np.float64) - np.asarray(base, np.float64)
        low, high = bootstrap_ci(diff)
        return cls(float(diff.mean()), low, high)

    def text(self) -> str:
        return f"{100 * self.delta:+.1f} ({100 * self.low:+.1f} to {100 * self.high:+.1f})"


@dataclass
class Row:
    """One candidate on the frontier: its cost, what happened to it (`status`, `reason`) and, where measured,
    its figures on the selection images (shares) and their paired differences from the original's."""

    name: str
    macs_ratio: float | None = None
    latency_ratio: float | None = None
    status: str = MEASURED
    reason: str = ""
    accuracy: float | None = None
    accuracy_delta: Delta | None = None
    accuracy_images: int | None = None  # the images accuracy is over: the selection part, and the calibration
    # part where the candidate was not calibrated on it
    consistency: float | None = None
    consistency_delta: Delta | None = None
    one_pixel: float | None = None
    one_pixel_delta: Delta | None = None
    seconds: float = 0.0
    calibration: dict | None = None  # what calibrating it did: method, time share, epochs run and kept, lr

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Rule:
    """The choice's terms: the largest accuracy loss allowed (points), what accuracy is (`top-1` with labels,
    else `fidelity`), the consistency protocol that decides and its pairs per image (0: not yet known)."""

    tolerance: float = 0.5
    accuracy: str = "fidelity"
    protocol: str = "random-crop"
    pairs: int = 0

    def __post_init__(self) -> None:
        if not self.tolerance >= 0:
            raise SettingError("tolerance", "must be 0 or more points", self.tolerance)

    def describe(self) -> str:
        return (
            f"the largest lower bound of the paired {self.protocol} consistency gain "
            f"({f'{self.pairs} pairs per image, ' if self.pairs else ''}95 % interval, above zero) "
            f"among the candidates within the budget that lose at most {self.tolerance:g} points of {self.accuracy} "
            "(paired mean over every image the candidate was not calibrated on); ties: fewer multiply-adds"
        )

    def disqualifies(self, row: Row) -> str | None:
        """Why `row` cannot be chosen, or None."""
        if row.status != MEASURED or row.consistency_delta is None or row.accuracy_delta is None:
            return row.status
        if 100 * row.accuracy_delta.delta < -self.tolerance - 1e-9:
            return f"{self.accuracy} {100 * row.accuracy_delta.delta:+.1f} points, beyond the tolerance"
        if row.consistency_delta.low <= 0:
            return "consistency gain not above zero"
        return None

    def choose(self, rows: list[Row]) -> Row | None:
        """The chosen row among `rows` (the first is the original, never chosen), or None."""
        eligible = [(i, r) for i, r in enumerate(rows) if i > 0 and self.disqualifies(r) is None]
        if not eligible:
            return None
        key = lambda item: (-round(item[1].consistency_delta.low, 9), item[1].macs_ratio or 1.0, item[0])  # noqa: E731
        return min(eligible, key=key)[1]
