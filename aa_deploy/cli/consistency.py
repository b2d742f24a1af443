"""`aa-deploy consistency`: shift consistency of ONNX models on real images."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console

from aa_deploy.atomic import write_text
from aa_deploy.cli import common
from aa_deploy.consistency import compare
from aa_deploy.consistency.paired import paired_difference
from aa_deploy.consistency.plots import plot
from aa_deploy.consistency.protocols import PROTOCOLS
from aa_deploy.report import print_consistency


def add(sub) -> None:
    m = sub.add_parser("consistency", help="shift consistency of ONNX models on real images")
    m.add_argument("model", help="the baseline ONNX model (e.g. the original)")
    m.add_argument("--compare", nargs="+", metavar="MODEL", help="models to compare with it (e.g. converted)")
    m.add_argument("--images", help="image folder, bundled:cifar10 or bundled:photos (default: by input size)")
    m.add_argument("--labels", help="CSV of file,label rows (class indices) for accuracy; else folder-per-class")
    m.add_argument("--protocol", default="random-crop", choices=list(PROTOCOLS))
    m.add_argument(
        "--shift",
        type=int,
        help="largest shift in pixels (default 32, or 4 for pad-and-crop, 2 circular; one-pixel: the number of steps, 8)",
    )
    m.add_argument("--crop", type=int, help="view size (default: the model's input size)")
    m.add_argument(
        "--pad", choices=["reflect", "zero", "replicate"], help="pad-and-crop shifts with this padding (small images)"
    )
    m.add_argument("--output", metavar="NAME", help="the output to measure (default: the first)")
    m.add_argument("--passes", type=int, default=5, help="passes of random pairs (random-crop, circular)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--limit", type=int, help="use at most this many images")
    m.add_argument("--batch", type=int, default=64)
    m.add_argument(
        "--backend", default="onnxruntime", choices=["onnxruntime", "tensorrt"], help="tensorrt: the models are engines"
    )
    m.add_argument(
        "--provider", default="cpu", choices=["cpu", "cuda", "tensorrt"], help="ONNX Runtime execution provider"
    )
    common.add_preprocess(m)
    m.add_argument("--report", help="write the JSON report here")
    m.add_argument("--plot", help="write a PNG plot here")
    m.set_defaults(run=run)


def run(args: argparse.Namespace, console: Console) -> int:

    models = [args.model, *(args.compare or [])]
    common.refuse_overwrites(
        (args.report, args.plot), (*models, args.preprocess, args.labels, args.images if args.images else None)
    )
    preprocess = common.preprocess(args, args.crop)
    results, data = compare.compare(
        models,
        progress=_progress_bar(console, "views"),
        labels=args.labels,
        images=args.images,
        protocol=args.protocol,
        shift=args.shift,
        crop=args.crop,
        passes=args.passes,
        seed=args.seed,
        pad=args.pad,
        preprocess=preprocess,
        batch=args.batch,
        provider=args.provider,
        backend=args.backend,
        limit=args.limit,
        output=args.output,
        layout=args.layout,
    )
    base = results[str(args.model)]
    versus = {name: paired_difference(base, r) for name, r in results.items() if r is not base}
    print_consistency(results, versus, data.source, console)
    if args.report:
        payload = {
            "schema": "aa-deploy.consistency/2",
            "protocol": args.protocol,
            "images": data.source,
            "models": {name: r.as_dict() for name, r in results.items()},
            "versus_first": {name: d.as_dict() for name, d in versus.items()},
        }
        write_text(args.report, json.dumps(payload, indent=2) + "\n")
    if args.plot:
        plot({Path(n).name: r for n, r in results.items()}, args.plot, f"{args.protocol} on {Path(data.source).name}")
    return common.EXIT_OK


def _progress_bar(console: Console, unit: str):
    """A factory for `with factory(total) as advance: advance(n)`: a rich bar on a terminal, nothing elsewhere."""
    from contextlib import contextmanager

    @contextmanager
    def bar(total: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
            disable=not console.is_terminal,
        ) as progress:
            task = progress.add_task(unit, total=total)
            yield lambda n: progress.advance(task, n)

    return bar
