"""PNG plots of consistency results (matplotlib, headless)."""

from __future__ import annotations

import os

from aa_deploy.common.atomic import atomic_path
from aa_deploy.consistency.protocols import ConsistencyResult


def _save(fig, path: str | os.PathLike, title: str) -> None:
    """Title, layout, and an atomic PNG write."""
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)


def plot(results: dict[str, ConsistencyResult], path: str | os.PathLike, title: str) -> None:
    """Diagonal: agreement and p(class at offset 0) per offset, one line per model. Others: bars with 95 % CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(results.values()))
    if first.protocol == "diagonal":
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        for name, r in results.items():
            a1.plot(r.curve["offset"], r.curve["agreement"], marker="o", label=name)
            a2.plot(r.curve["offset"], r.curve["probability"], marker="o", label=name)
        a1.set(xlabel="diagonal shift (px)", ylabel="top-1 agreement with the unshifted view", ylim=(0, 1.02))
        a2.set(xlabel="diagonal shift (px)", ylabel="p(class of the unshifted view)", ylim=(0, 1.02))
        a1.legend()
    else:
        fig, a1 = plt.subplots(figsize=(max(5, 1.6 * len(results)), 4))
        names = list(results)
        values = [100 * results[n].consistency for n in names]
        errors = [
            [100 * (results[n].consistency - results[n].ci95[0]) for n in names],
            [100 * (results[n].ci95[1] - results[n].consistency) for n in names],
        ]
        a1.bar(names, values, yerr=errors, capsize=4, color="#4477aa", label="consistency")
        if all(results[n].accuracy is not None for n in names):
            a1.plot(names, [100 * results[n].accuracy for n in names], "D", color="#cc6677", label="top-1 accuracy")
            a1.legend(loc="lower right")
        low = min(values + [100 * (results[n].accuracy or 1) for n in names])
        a1.set(ylabel="%", ylim=(max(0, low - 10), 100))
        plt.setp(a1.get_xticklabels(), rotation=15, ha="right")
    _save(fig, path, title)


def plot_probe(results: dict[str, list], path: str | os.PathLike, title: str) -> None:
    """Per site: the share of energy above Nyquist and the one-pixel shift error, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(results)
    sites = [f"{p.index}: {p.kind}" for p in results[names[0]]]
    x = np.arange(len(sites))
    width = 0.8 / len(names)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(max(8, 1.2 * len(sites) + 4), 4))
    for k, name in enumerate(names):
        probes = results[name]
        a1.bar(x + k * width, [100 * p.aliasing for p in probes], width, label=name)
        a2.bar(x + k * width, [p.subpixel_error or 0 for p in probes], width, label=name)
    a1.set(ylabel="% of energy above the site's Nyquist", title="aliasing before subsampling")
    a2.set(ylabel="||f(shift 1 px) - interpolation|| / ||f||", title="one-pixel shift beyond interpolation")
    for ax in (a1, a2):
        ax.set_xticks(x + width * (len(names) - 1) / 2, sites, rotation=30, ha="right")
    a1.legend()
    _save(fig, path, title)


def plot_shift_curve(results: dict[str, ConsistencyResult], path: str | os.PathLike, title: str) -> None:
    """The paper's plot: the mean probability of the correct class per diagonal shift, with the 95 %
    band of that mean over images (bootstrap), one line per model on one axis. Diagonal results
    measured with labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4))
    rng = np.random.default_rng(0)
    for name, r in results.items():
        p = np.asarray(r.curve["correct_probability"], np.float64)
        means = p[rng.integers(0, len(p), size=(2000, len(p)))].mean(axis=1)
        lo, hi = np.percentile(means, [2.5, 97.5], axis=0)
        line = ax.plot(r.curve["offset"], p.mean(axis=0), marker="o", label=name)[0]
        ax.fill_between(r.curve["offset"], lo, hi, color=line.get_color(), alpha=0.2)
    ax.set(xlabel="diagonal shift (px)", ylabel="p(correct class), mean over images")
    ax.legend()
    _save(fig, path, title)


FRONTIER_PANELS = (("random-crop_diff", "random-crop consistency"), ("one-pixel_diff", "one-pixel consistency"))


def plot_frontier(
    families: dict[str, list[dict]], path: str | os.PathLike, title: str = "", panels=FRONTIER_PANELS
) -> None:
    """Consistency gains with their paired intervals against the multiply-adds ratio: one panel per
    (key, title) of `panels`, one colour per network (`families`: name -> its rows, each a dict with `name`,
    `macs_ratio` and, per panel key, (difference, (low, high)) in shares), each point labelled by its model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), sharey=True, squeeze=False)
    for ax, (key, name) in zip(axes[0], panels):
        for k, (family, rows) in enumerate(families.items()):
            pts = [r for r in rows if r.get(key) is not None]
            x = [r["macs_ratio"] * (1 + 0.04 * (k - 1)) for r in pts]  # nudged apart: intervals stay legible
            y = [100 * r[key][0] for r in pts]
            err = [[100 * (r[key][0] - r[key][1][0]) for r in pts], [100 * (r[key][1][1] - r[key][0]) for r in pts]]
            ax.errorbar(x, y, yerr=err, fmt="o", capsize=3, label=family)
            for r, xi, yi in zip(pts, x, y):
                ax.annotate(r["name"], (xi, yi), textcoords="offset points", xytext=(5, -9 if k % 2 else 3), fontsize=7)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"x{v:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"x{v:g}" if v in (2, 3, 5, 7) else ""))
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("multiply-adds against the original")
    axes[0][0].set_ylabel("minus the original's, points (paired 95 % CI)")
    axes[0][0].legend(loc="best", fontsize=8)
    _save(fig, path, title)
