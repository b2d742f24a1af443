"""`aa-deploy tune`: the remedy for this model (dense sampling, blur + calibration, both, or none), chosen on
the user's images under the user's budget."""

from __future__ import annotations

import argparse
import json

from rich.console import Console

from aa_deploy.calibration.calibrate import Compute
from aa_deploy.cli import common
from aa_deploy.common import model_io
from aa_deploy.common.atomic import write_text
from aa_deploy.common.devices import DEVICES
from aa_deploy.common.errors import InputError
from aa_deploy.common.images import folder_labels, list_images
from aa_deploy.consistency import gate
from aa_deploy.converters.onnxruntime import PROVIDERS
from aa_deploy.tune import Budget, Images, Tried, Trying, tune
from aa_deploy.tune import report as tune_report

FLAGS = {"time_limit": "time_limit", "max_macs": "max_macs", "max_latency": "max_latency"}


def add(sub) -> None:
    t = sub.add_parser(
        "tune", help="choose the remedy for a model on your images under your budget (dense, blur + calibrate, both)"
    )
    t.add_argument("model", help="the original ONNX model")
    t.add_argument("--images", required=True, help="image folder: split into a calibration and a selection part")
    t.add_argument(
        "-o", "--output", required=True, help="where the chosen model goes (nothing is written when none qualifies)"
    )
    t.add_argument(
        "--labels", help="CSV of file,label rows: top-1 decides (default: a folder per class where there is one, "
        "else fidelity, top-1 agreement with the original's shift-averaged answer)",
    )  # fmt: skip
    t.add_argument("--max-macs", type=float, metavar="X", help="multiply-adds at most X times the original's")
    t.add_argument("--max-latency", type=float, metavar="X", help="latency at most X times the original's (batch 1)")
    t.add_argument(
        "--provider", default="cpu", choices=list(PROVIDERS),
        help="the ONNX Runtime provider --max-latency is timed on (the backend that will serve the model)",
    )  # fmt: skip
    t.add_argument(
        "--time-limit", type=float, metavar="MINUTES",
        help="end the search within this many minutes: candidates run cheapest first, the ones that calibrate "
        "share what is left, and a candidate that no longer fits is listed as out of time",
    )  # fmt: skip
    t.add_argument(
        "--tolerance", type=float, default=0.5, metavar="POINTS",
        help="the largest loss of top-1 (or fidelity) against the original a choice may have, paired mean "
        "over the images it was not calibrated on (default %(default)s)",
    )  # fmt: skip
    t.add_argument(
        "--selection", type=float, default=0.5, metavar="FRACTION",
        help="the share of the images kept for selection, never calibrated on (default %(default)s)",
    )  # fmt: skip
    t.add_argument(
        "--candidates", nargs="+", metavar="NAME",
        help="try only these (default: all but blur+refit): dense-1 .. dense-N, dense-1/diagonal .. "
        "dense-N/diagonal, blur+refit, blur+calibrate, blur+dense-1+calibrate",
    )  # fmt: skip
    t.add_argument("--limit", type=int, help="use at most this many images")
    t.add_argument("--seed", type=int, default=0, help="the split's and the calibrations' seed")
    t.add_argument(
        "--require", action="append", metavar="REQ", default=[],
        help="a gate on the choice's paired difference from the original on the selection images, in points, as "
        "consistency has it: 'consistency.lower>=0', 'top1>=-0.5', 'one-pixel>=0'; exit 1 (and no model written) "
        "when one fails",
    )  # fmt: skip
    t.add_argument("--junit", help="write a JUnit XML file here: one test case per requirement")
    t.add_argument("--report", help="write the JSON report here")
    t.add_argument("--plot", help="write the frontier plot (PNG) here")
    t.add_argument("--device", default="auto", choices=DEVICES, help="where calibration and measurement run")
    common.add_preprocess(t)
    t.set_defaults(run=run)


def _event(console: Console, event: object) -> None:
    if isinstance(event, Trying):
        console.print(f"{event.name}: measuring" + (f" ({event.detail})" if event.detail else ""))
    elif isinstance(event, Tried):
        r = event.row
        if r.name == "original":
            console.print(
                f"  original: {r.accuracy * 100:.1f} % accuracy, {r.consistency * 100:.1f} % consistency, {r.seconds:.0f} s"
            )
        elif r.status == "measured":
            console.print(
                f"  {r.name}: {r.consistency_delta.text()} consistency, {r.accuracy_delta.text()} accuracy, "
                f"{r.seconds:.0f} s"
            )
        else:
            console.print(f"  {r.name}: {r.status}" + (f" ({r.reason})" if r.reason else ""))


def run(args: argparse.Namespace, console: Console) -> int:
    requirements = [gate.parse(text) for text in args.require]
    common.at_least_1(args, "limit")
    common.refuse_overwrites(
        (args.output, args.report, args.plot, args.junit), (args.model, args.preprocess, args.labels, args.images)
    )
    with common.setting_errors(args, FLAGS):
        budget = Budget(
            args.max_macs, args.max_latency, args.provider, None if args.time_limit is None else 60 * args.time_limit
        )
        images = Images(
            args.images, common.preprocess(args, model=args.model), args.labels, args.selection, args.limit, args.layout
        )
        compute = Compute(device=args.device)
    if any(r.metric == "top1" for r in requirements) and not args.labels:
        if folder_labels(list_images(args.images), args.images) is None:
            raise InputError("--require top1 needs labels (--labels, or a folder per class)")
    model = model_io.load(args.model)
    console.print(f"budget: {budget.describe()}" + (f"; time limit {args.time_limit:g} min" if args.time_limit else ""))
    with common.progress_bars(console, lambda e: _event(console, e)) as progress, common.setting_errors(args):
        tuned = tune(
            model, images, budget, args.tolerance, compute, seed=args.seed,
            only=tuple(args.candidates) if args.candidates else None, name=args.model, progress=progress,
        )  # fmt: skip
    console.print(tune_report.Frontier(tuned))
    outcomes = tune_report.check(requirements, tuned)
    for outcome in outcomes:
        console.print(outcome.line if outcome.passed else f"[red]{outcome.line}[/red]")
    if args.junit:
        gate.write_junit(outcomes, args.junit, "aa-deploy tune")
    if args.report:
        write_text(args.report, json.dumps(tune_report.payload(tuned, args.model, outcomes), indent=2) + "\n")
    if args.plot and any(r.status == "measured" for r in tuned.rows[1:]):
        tune_report.plot(tuned, args.plot, f"tune: {len(tuned.split.selection)} selection images")
    passed = all(o.passed for o in outcomes)
    if tuned.model is None or not passed:
        if not passed:
            console.print(
                f"[red]FAIL: {sum(not o.passed for o in outcomes)} of {len(outcomes)} requirements not met; no model written[/red]"
            )
        return common.EXIT_NOTHING
    model_io.save(tuned.model, args.output, external=model_io.uses_external_data(tuned.model))
    console.print(f"wrote {args.output}")
    return common.EXIT_OK
