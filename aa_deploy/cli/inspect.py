"""`aa-deploy inspect`: list every downsampling site and what convert would do."""

from __future__ import annotations

import argparse
import json

from rich.console import Console

from aa_deploy.cli import common
from aa_deploy.common import model_io
from aa_deploy.conversion.graph_pass import dense_costs, inspect, plan_cost
from aa_deploy.conversion.report import print_sites


def add(sub) -> None:
    q = sub.add_parser("inspect", help="list every downsampling site and what convert would do")
    q.add_argument("model")
    q.add_argument("--json", action="store_true", help="print the plan as JSON")
    common.add_target_opset(q)
    common.add_options(q)
    q.set_defaults(run=run)


def run(args: argparse.Namespace, console: Console) -> int:
    model = model_io.load(args.model, args.target_opset)
    options = common.options(args)
    actions = inspect(model, options)
    if not args.json:
        common.print_upgrade(model_io.read_metadata(model).get("opset_upgrade"), console)
    price = plan_cost(model, options) if actions else None
    per_level = dense_costs(model, options) if actions and options.dense_last else []
    if args.json:
        print(
            json.dumps(
                {
                    "sites": [a.describe() for a in actions],
                    "cost": price
                    and {
                        "original_multiply_adds": price.original,
                        "converted_multiply_adds": price.converted,
                        "ratio": price.ratio,
                        "uncounted_nodes": price.unknown,
                    },
                }
                | ({"dense_costs": [c.as_dict() for c in per_level]} if per_level else {}),
                indent=2,
            )
        )
    elif not actions:
        console.print(f"{args.model}: no downsampling sites found")
    else:
        print_sites(
            actions,
            f"{args.model}: {len(actions)} sites, {sum(a.action != 'skip' for a in actions)} to change",
            console,
        )
        console.print(price.describe())
        for c in per_level:
            console.print(
                f"  --dense-last {c.n}: "
                + (f"x{c.cost.ratio:.2f} multiply-adds" if c.cost else f"refused ({c.refused})")
            )
    return common.EXIT_OK if actions else common.EXIT_NOTHING
