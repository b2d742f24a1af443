"""Human tables for sites and actions (rich), shared by inspect, convert and demo."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from aa_deploy.conversion.plan import Action


def sites_table(actions: list[Action], title: str) -> Table:
    """One row per site: node, op, stride, channels, layout, action."""
    table = Table(title=title, title_justify="left")
    for column in ("#", "node", "scope", "kind", "op", "stride", "channels", "layout", "action", "note"):
        table.add_column(column, overflow="fold")
    for i, a in enumerate(actions):
        s = a.site
        action = a.action
        if a.spec is not None:
            taps = "x".join(str(len(t)) for t in a.spec.taps)
            action = f"{a.action} {taps} {a.spec.pad_mode}"
        table.add_row(
            str(i),
            s.name,
            s.scope,
            s.kind,
            s.op,
            "x".join(map(str, s.strides)),
            str(s.channels if s.channels is not None else "?"),
            s.layout,
            action,
            a.note,
        )
    return table


def print_sites(actions: list[Action], title: str, console: Console | None = None) -> None:
    (console or Console()).print(sites_table(actions, title))


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def print_parity(result, console: Console) -> None:
    """The parity (or change) table and a one-line verdict."""
    label = "change vs plain model" if result.kind == "change" else "parity"
    table = Table(
        title=f"{label}: {result.model} on {result.backend} ({result.precision}) vs {result.reference}"
        + (" twin" if result.reference_antialiased else ""),
        title_justify="left",
    )
    for column in ("output", "shape", "max abs", "max rel", "min cosine", "top-1 agree", "top-5 agree", "result"):
        table.add_column(column)
    for o in result.outputs:
        verdict = "changed" if result.kind == "change" else ("pass" if o.passed else f"FAIL: {o.failure}")
        table.add_row(
            o.name,
            "x".join(map(str, o.shape)),
            f"{o.max_abs:.3g}",
            f"{o.max_rel:.3g}",
            f"{o.cosine_min:.6f}",
            _pct(o.top1_agreement),
            _pct(o.top5_agreement),
            verdict,
        )
    console.print(table)
    inputs = result.inputs
    console.print(f"inputs: {inputs.get('count')} x {inputs.get('shape')} from {inputs.get('source')}")
    if result.kind == "change":
        console.print("CHANGE (not a failure): how much the anti-aliasing moved the outputs")
    else:
        tol = result.tolerance
        console.print(
            ("PASS" if result.passed else "FAIL")
            + f" (atol {tol['atol']:g}, rtol {tol['rtol']:g}, min top-1 {tol['min_top1']:g}, min cosine {tol['min_cosine']:g})"
        )


def print_consistency(results: dict, versus: dict, source: str, console: Console) -> None:
    """One row per model: consistency with its 95 % interval (over images), accuracy, views run, and
    for each model after the first its paired difference from the first (`versus`: name -> PairedDelta)."""
    first = next(iter(results.values()))
    settings = ", ".join(
        f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in first.settings.items() if v is not None
    )
    what = "consistency" if first.metric == "top-1 agreement" else "output stability (cosine of the two views' outputs)"
    table = Table(title=f"{first.protocol} {what} on {source} ({settings})", title_justify="left")
    for column in (
        "model",
        "consistency %" if first.metric == "top-1 agreement" else "cosine %",
        "95% CI",
        "vs first: diff (95% CI)",
        "top-1 %",
        "images",
        "views",
    ):
        table.add_column(column)
    for name, r in results.items():
        d = versus.get(name)
        table.add_row(
            name,
            f"{100 * r.consistency:.1f}",
            f"{100 * r.ci95[0]:.1f}-{100 * r.ci95[1]:.1f}",
            "" if d is None else f"{100 * d.delta:+.1f} ({100 * d.ci95[0]:+.1f} to {100 * d.ci95[1]:+.1f})",
            _pct(r.accuracy),
            str(r.images),
            str(r.views),
        )
    console.print(table)


def print_cost(costs: dict, baseline: str, console: Console) -> None:
    """What each model costs at inference against the baseline: multiply-adds and, where timed, latency
    at each batch size (median of alternating runs on the backend that measured consistency)."""
    batches = sorted({t["batch"] for c in costs.values() for t in c.get("latency", [])})
    table = Table(title=f"inference cost against {baseline}", title_justify="left")
    for column in ("model", "multiply-adds", "x baseline", *(f"latency batch {b}" for b in batches)):
        table.add_column(column)
    for name, c in costs.items():
        macs = c["multiply_adds"]
        timed = {t["batch"]: t for t in c.get("latency", [])}
        table.add_row(
            name,
            "-" if macs is None else f"{macs / 1e6:,.1f} M",
            "-" if c["multiply_adds_ratio"] is None else f"x{c['multiply_adds_ratio']:.2f}",
            *(f"x{timed[b]['ratio']:.2f} ({timed[b]['ms']:.1f} ms)" if b in timed else "baseline" for b in batches),
        )
    console.print(table)
