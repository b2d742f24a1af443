"""Latency of one runner against another, measured side by side: runs alternate A B A B, each side of
a pair the shortest of `reps` back-to-back runs (the least disturbed by other load), and the figure is
the median of the per-pair ratios: a noisy machine slows both sides of a pair alike."""

from __future__ import annotations

import statistics
import time

import numpy as np


def best_of(runner, feed: dict, reps: int) -> float:
    """Shortest of `reps` back-to-back runs, in seconds."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        runner.run(feed)
        times.append(time.perf_counter() - t0)
    return min(times)


def pair_ratios(a, b, x: np.ndarray, pairs: int, reps: int, warmup: int = 3) -> tuple[list[float], float]:
    """Per-pair ratios B/A (each side the best of `reps` runs) and A's median time in ms."""
    feed_a, feed_b = {a.input_names[0]: x}, {b.input_names[0]: x}
    for _ in range(warmup):
        a.run(feed_a)
        b.run(feed_b)
    ratios, base = [], []
    for _ in range(pairs):
        ta = best_of(a, feed_a, reps)
        tb = best_of(b, feed_b, reps)
        ratios.append(tb / ta)
        base.append(ta)
    return ratios, 1000 * statistics.median(base)


def latency_ratio(a, b, x: np.ndarray, pairs: int = 5, reps: int = 3) -> dict:
    """B's latency against A's on input `x`: the median per-pair ratio and both sides' milliseconds."""
    ratios, ms = pair_ratios(a, b, x, pairs, reps, warmup=1)
    ratio = statistics.median(ratios)
    return {"batch": int(x.shape[0]), "ratio": ratio, "baseline_ms": ms, "ms": ms * ratio, "pairs": pairs}
