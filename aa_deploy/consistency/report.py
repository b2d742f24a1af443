"""What `consistency` prints: the models' consistency side by side, and what each costs at inference."""

from __future__ import annotations

from dataclasses import dataclass

from rich.table import Table

from aa_deploy.consistency.paired import PairedDelta
from aa_deploy.consistency.protocols import ConsistencyResult


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


@dataclass(frozen=True)
class Compared:
    """The models measured on the same views (`results`, the baseline first), each later model's paired
    difference from the baseline (`versus`), and the images' source; prints as one row per model:
    consistency with its 95 % interval (over images), the paired difference, accuracy, views run."""

    results: dict[str, ConsistencyResult]
    versus: dict[str, PairedDelta]
    source: str

    def __rich__(self) -> Table:
        first = next(iter(self.results.values()))
        settings = ", ".join(
            f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in first.settings.items() if v is not None
        )
        top1 = first.metric == "top-1 agreement"
        what = "consistency" if top1 else "output stability (cosine of the two views' outputs)"
        table = Table(title=f"{first.protocol} {what} on {self.source} ({settings})", title_justify="left")
        for column in (
            "model",
            "consistency %" if top1 else "cosine %",
            "95% CI",
            "vs first: diff (95% CI)",
            "top-1 %",
            "images",
            "views",
        ):
            table.add_column(column)
        for name, r in self.results.items():
            d = self.versus.get(name)
            table.add_row(
                name,
                f"{100 * r.consistency:.1f}",
                f"{100 * r.ci95[0]:.1f}-{100 * r.ci95[1]:.1f}",
                "" if d is None else f"{100 * d.delta:+.1f} ({100 * d.ci95[0]:+.1f} to {100 * d.ci95[1]:+.1f})",
                _pct(r.accuracy),
                str(r.images),
                str(r.views),
            )
        return table


@dataclass(frozen=True)
class Costs:
    """What each model costs at inference against the baseline (`sides.Models.costs`' entries): multiply-adds
    and, where timed, latency at each batch size (median of alternating runs on the backend that measured
    consistency)."""

    costs: dict[str, dict]
    baseline: str

    def __rich__(self) -> Table:
        batches = sorted({t["batch"] for c in self.costs.values() for t in c.get("latency", [])})
        table = Table(title=f"inference cost against {self.baseline}", title_justify="left")
        for column in ("model", "multiply-adds", "x baseline", *(f"latency batch {b}" for b in batches)):
            table.add_column(column)
        for name, c in self.costs.items():
            macs = c["multiply_adds"]
            timed = {t["batch"]: t for t in c.get("latency", [])}
            table.add_row(
                name,
                "-" if macs is None else f"{macs / 1e6:,.1f} M",
                "-" if c["multiply_adds_ratio"] is None else f"x{c['multiply_adds_ratio']:.2f}",
                *(f"x{timed[b]['ratio']:.2f} ({timed[b]['ms']:.1f} ms)" if b in timed else "baseline" for b in batches),
            )
        return table
