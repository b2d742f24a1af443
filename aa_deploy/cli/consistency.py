"""`aa-deploy consistency`: shift consistency of ONNX models on real images, against an ONNX baseline
or the PyTorch original (`--reference`), with a gate (`--require`) and what each model costs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console

from aa_deploy.cli import common
from aa_deploy.common.atomic import write_text
from aa_deploy.common.devices import DEVICES
from aa_deploy.common.errors import InputError
from aa_deploy.consistency import compare, gate, sides
from aa_deploy.consistency.paired import paired_difference
from aa_deploy.consistency.plots import plot
from aa_deploy.consistency.protocols import PROTOCOLS
from aa_deploy.consistency.report import Compared, Costs
from aa_deploy.converters.backends import BACKENDS
from aa_deploy.converters.export import load_model
from aa_deploy.converters.onnxruntime import PROVIDERS


def add(sub) -> None:
    m = sub.add_parser("consistency", help="shift consistency of ONNX models on real images")
    m.add_argument(
        "model", nargs="?", help="the baseline ONNX model (e.g. the original); with --reference, a model to compare"
    )
    m.add_argument("--compare", nargs="+", metavar="MODEL", help="models to compare with it (e.g. converted)")
    m.add_argument(
        "--reference",
        metavar="NAME",
        help="the PyTorch original as the baseline: timm:NAME, torchvision:NAME, aa:NAME or package.module:factory (as verify)",
    )
    m.add_argument("--weights", help="checkpoint (state_dict) for --reference")
    m.add_argument("--device", default="cpu", choices=DEVICES[1:], help="where --reference runs")
    m.add_argument(
        "--require",
        action="append",
        metavar="REQ",
        default=[],
        help="a gate on each model's paired difference from the baseline, in points: METRIC[.lower|.upper]OP N, "
        "e.g. 'top1>=-0.5', 'consistency.lower>=0' (metrics: top1, consistency or the protocol's name, stability); "
        "exit 1 when one fails",
    )
    m.add_argument("--junit", help="write a JUnit XML file here: one test case per requirement per model")
    m.add_argument("--no-latency", action="store_true", help="do not time the models against the baseline")
    m.add_argument("--images", help="image folder, bundled:cifar10 or bundled:photos (default: by input size)")
    m.add_argument("--labels", help="CSV of file,label rows (class indices) for accuracy; else folder-per-class")
    m.add_argument("--protocol", default="random-crop", choices=list(PROTOCOLS))
    m.add_argument(
        "--shift",
        type=int,
        help="largest shift in pixels (default 32, or 4 for pad-and-crop, 2 circular; one-pixel: the number of steps, 8)",
    )
    m.add_argument(
        "--crop", type=common.image_size, help="view size: one side or HEIGHTxWIDTH (default: the model's input size)"
    )
    m.add_argument(
        "--pad", choices=["reflect", "zero", "replicate"], help="pad-and-crop shifts with this padding (small images)"
    )
    m.add_argument("--output", metavar="NAME", help="the output to measure (default: the first)")
    m.add_argument("--passes", type=int, default=5, help="passes of random pairs (random-crop, circular)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--limit", type=int, help="use at most this many images")
    m.add_argument("--batch", type=int, default=64)
    m.add_argument("--backend", default="onnxruntime", choices=BACKENDS, help="tensorrt: the models are engines")
    m.add_argument("--provider", default="cpu", choices=list(PROVIDERS), help="ONNX Runtime execution provider")
    common.add_preprocess(m)
    m.add_argument("--report", help="write the JSON report here")
    m.add_argument("--plot", help="write a PNG plot here")
    m.set_defaults(run=run)


def run(args: argparse.Namespace, console: Console) -> int:
    requirements = [gate.parse(text) for text in args.require]
    models = [m for m in (args.model, *(args.compare or [])) if m is not None]
    if args.reference is None and args.model is None:
        raise InputError("give the baseline model, or the PyTorch original with --reference NAME")
    common.refuse_overwrites(
        (args.report, args.plot, args.junit), (*models, args.weights, args.preprocess, args.labels, args.images)
    )
    onnx_model = args.model if args.backend != "tensorrt" else None  # an engine's size: from its sidecar, later
    preprocess = common.preprocess(args, args.crop, model=onnx_model)
    with common.setting_errors(args):
        measurement = compare.Measurement(
            args.protocol, args.shift, args.crop, args.passes, args.seed, args.pad, args.batch, args.output
        )
        images = compare.Images(args.images, preprocess, args.limit, args.labels)
    reference = None
    if args.reference is not None:
        reference = (f"reference:{args.reference}", load_model(args.reference, args.weights)[0])
    elif args.weights is not None:
        raise InputError("--weights goes with --reference")
    models = sides.Models(tuple(models), args.backend, args.provider, reference, args.device, args.layout)
    runners = models.runners()
    with common.progress_bars(console) as progress:
        results, data = compare.compare(runners, models.input_format(), measurement, images, progress)
    baseline = next(iter(results))
    if requirements and len(results) < 2:
        raise InputError(
            "--require compares models with the baseline: give one (--compare, or a model with --reference)"
        )
    base = results[baseline]
    versus = {name: paired_difference(base, r) for name, r in results.items() if r is not base}
    console.print(Compared(results, versus, data.source))
    costs = models.costs(runners, data, args.batch, latency=not args.no_latency)
    for runner in runners.values():  # measured: the sessions and engines go before the report is written
        runner.deactivate()
    if len(costs) > 1:
        console.print(Costs(costs, baseline))
    outcomes = gate.check(requirements, results, baseline)
    for outcome in outcomes:
        console.print(outcome.line if outcome.passed else f"[red]{outcome.line}[/red]")
    if args.junit:
        gate.write_junit(outcomes, args.junit)
    if args.report:
        payload = gate.report(args.protocol, data.source, results, versus, costs, outcomes)
        write_text(args.report, json.dumps(payload, indent=2) + "\n")
    if args.plot:
        plot({Path(n).name: r for n, r in results.items()}, args.plot, f"{args.protocol} on {Path(data.source).name}")
    if not all(o.passed for o in outcomes):
        failed = sum(not o.passed for o in outcomes)
        console.print(f"[red]FAIL: {failed} of {len(outcomes)} requirements not met[/red]")
        return common.EXIT_NOTHING
    if outcomes:
        console.print(f"PASS: {len(outcomes)} requirements met")
    return common.EXIT_OK
