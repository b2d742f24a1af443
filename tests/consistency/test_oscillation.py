"""The oscillation of the diagonal-shift curve, on curves whose swing is known."""

from __future__ import annotations

import numpy as np
import pytest

from aa_deploy.consistency import measure
from aa_deploy.consistency.oscillation import oscillation, paired_oscillation
from aa_deploy.consistency.protocols import ConsistencyResult


def _diagonal(per_image: np.ndarray) -> ConsistencyResult:
    n, k = per_image.shape
    curve = {"offset": list(range(k)), "correct_probability": per_image.tolist()}
    return ConsistencyResult("diagonal", 1.0, (1.0, 1.0), None, n, n * k, curve=curve)


def test_the_amplitude_is_the_peak_to_peak_of_the_mean_after_the_trend():
    d = np.arange(5)
    # mean curve: a trend (0.9 falling by 0.01 per px) plus a bump of 0.06 at d = 2 over the period of 4
    bump = np.array([0.0, 0.03, 0.06, 0.03, 0.0])
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.02, size=(400, 5))
    per_image = 0.9 - 0.01 * d + bump + noise - noise.mean(0)  # the mean over images is exact
    o = oscillation(_diagonal(per_image), period=4)
    assert o.amplitude == pytest.approx(0.06, abs=1e-9)
    assert o.ci95[0] < 0.06 < o.ci95[1] and o.ci95[1] - o.ci95[0] < 0.02
    flat = oscillation(_diagonal(0.9 - 0.01 * d + noise - noise.mean(0)), period=4)
    assert flat.amplitude == pytest.approx(0.0, abs=1e-9)
    delta, ci = paired_oscillation(_diagonal(per_image), _diagonal(0.9 - 0.01 * d + noise - noise.mean(0)), 4)
    assert delta == pytest.approx(-0.06, abs=1e-9) and ci[1] < 0


def test_circular_diagonal_of_a_stride_2_subsampler_swings_and_its_blurred_twin_does_not():
    """A classifier that reads one pixel of every 2x2 cell (no filter) answers differently at odd and
    even diagonal rolls; averaging each 2x2 cell first makes the answer the same at every roll."""
    rng = np.random.default_rng(1)
    lattice = np.zeros((16, 16), bool)
    lattice[::2, ::2] = True  # bright on the even-even lattice the strided classifier reads at d = 0
    images = np.where(lattice[None, :, :, None], 200, 40) + rng.integers(0, 16, size=(64, 16, 16, 3))
    images = images.astype(np.uint8)
    labels = np.zeros(64, int)

    def prepare(x):
        return x.astype(np.float32).transpose(0, 3, 1, 2) / 255.0

    def strided(x):
        s = x[:, 0, ::2, ::2].mean(axis=(1, 2))
        return np.stack([8 * (s - 0.5), np.zeros_like(s)], axis=1)

    def pooled(x):
        s = x[:, 0].mean(axis=(1, 2))
        return np.stack([8 * (s - 0.5), np.zeros_like(s)], axis=1)

    aliased = measure("diagonal", strided, prepare, images, crop=16, shift=4, labels=labels, circular=True)
    smooth = measure("diagonal", pooled, prepare, images, crop=16, shift=4, labels=labels, circular=True)
    assert aliased.curve["offset"] == [0, 1, 2, 3, 4]
    p = np.asarray(aliased.curve["correct_probability"]).mean(0)
    assert p[0] > 0.9 and p[1] < 0.1 and p[2] > 0.9  # the correct class wins where the bright lattice is read
    assert oscillation(aliased, 2).amplitude == pytest.approx(p[0] - p[1])
    assert oscillation(smooth, 2).amplitude == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="measured with labels"):
        oscillation(measure("diagonal", pooled, prepare, images, crop=16, shift=4, circular=True), 2)
