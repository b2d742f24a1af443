"""Shift protocols over a batched classifier `run(x: NCHW float32) -> logits`."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Runner = Callable[[np.ndarray], np.ndarray]


def top1(run: Runner, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """Top-1 class per image, in batches."""
    return np.concatenate([run(x[i : i + batch]).argmax(axis=1) for i in range(0, len(x), batch)])


def circular_agreement(run: Runner, x: np.ndarray, max_shift: int = 2) -> float:
    """Share of (image, shift) pairs, over every circular shift (dy, dx) != 0 within ±max_shift,
    whose top-1 equals the unshifted image's (torch.roll-style shifts: nothing leaves the frame)."""
    base = top1(run, x)
    agree = total = 0
    for dy in range(-max_shift, max_shift + 1):
        for dx in range(-max_shift, max_shift + 1):
            if dy == dx == 0:
                continue
            shifted = np.roll(x, (dy, dx), axis=(2, 3))
            agree += int((top1(run, shifted) == base).sum())
            total += len(x)
    return agree / total
