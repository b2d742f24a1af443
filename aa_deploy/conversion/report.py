"""The sites table (rich): one row per downsampling site and what the pass does there, for inspect, convert
and demo."""

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
