"""Feeding a model whose batch dimension is fixed (most exports: `torch.onnx.export(m, x1, path)`
without dynamic axes fixes it at 1): any number of samples goes through in batches of exactly that
size, the last one filled up by repeating its last sample, and the outputs are joined and trimmed."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from aa_deploy.common.errors import InputError


def fixed_batch(dims) -> int | None:
    """The fixed batch size of an input with `dims` (ints, or names/None for dynamic), or None."""
    first = dims[0] if dims else None
    return first if isinstance(first, int) and first > 0 else None


def fill(part: np.ndarray, batch: int) -> np.ndarray:
    """`part` (at most `batch` samples) filled up to `batch` by repeating its last sample."""
    if len(part) >= batch:
        return part
    return np.concatenate([part, np.repeat(part[-1:], batch - len(part), axis=0)])


def run_in_batches(
    run: Callable[[dict], list],
    feeds: dict[str, np.ndarray],
    batch: int | None,
    output_names: Callable[[], list[str] | None],
    max_batch: int | None = None,
) -> list[np.ndarray]:
    """`run(feeds)` for a model that takes exactly `batch` samples (None: any number, in chunks of at
    most `max_batch` when one is given: an engine's profile ends there); `output_names()` names the
    outputs in errors (a runner may learn them from its first result)."""
    n = len(next(iter(feeds.values())))
    if batch is None and max_batch is not None and n > max_batch:
        parts = [run({k: x[i : i + max_batch] for k, x in feeds.items()}) for i in range(0, n, max_batch)]
        return [np.concatenate(chunks) for chunks in zip(*parts)]
    if batch is None or n == batch:
        return run(feeds)
    parts = []
    for start in range(0, n, batch):
        outs = run({name: fill(x[start : start + batch], batch) for name, x in feeds.items()})
        for name, out in zip(output_names() or range(len(outs)), outs):
            if out.ndim == 0 or out.shape[0] != batch:
                raise InputError(
                    f"the model takes a fixed batch of {batch} but its output {name!r} has shape {tuple(out.shape)}, "
                    f"whose first axis is not that batch: feed it {batch} samples at a time yourself"
                )
        parts.append(outs)
    return [np.concatenate(chunks)[:n] for chunks in zip(*parts)]
