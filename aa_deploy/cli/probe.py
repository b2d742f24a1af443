"""`aa-deploy probe`: where the aliasing happens: per-site spectra and shift equivariance."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console

from aa_deploy.cli import common
from aa_deploy.common import bundled
from aa_deploy.common.atomic import write_text
from aa_deploy.common.errors import InputError
from aa_deploy.common.progress import titled
from aa_deploy.consistency.compare import load_images
from aa_deploy.consistency.plots import plot_probe
from aa_deploy.consistency.probe import payload, probe, probe_module, table
from aa_deploy.converters.export import load_model


def add(sub) -> None:
    r = sub.add_parser("probe", help="where the aliasing happens: per-site spectra and shift equivariance")
    r.add_argument("model", nargs="?", help="the ONNX model (with --reference: a model to probe beside it)")
    r.add_argument("--compare", nargs="+", metavar="MODEL", help="converted models to probe at the same sites")
    r.add_argument(
        "--reference",
        metavar="NAME",
        help="probe the PyTorch original first (timm:NAME, torchvision:NAME, aa:NAME, package.module:factory)",
    )
    r.add_argument("--weights", help="checkpoint (state_dict) for --reference")
    r.add_argument("--images", help="image folder, bundled:cifar10 or bundled:photos (default: by input size)")
    r.add_argument("--count", type=int, default=32, help="number of images")
    r.add_argument("--report", help="write the JSON report here")
    r.add_argument("--plot", help="write a PNG bar chart here")
    common.add_preprocess(r)
    r.set_defaults(run=run)


def run(args: argparse.Namespace, console: Console) -> int:
    common.at_least_1(args, "count")
    models = [m for m in (args.model, *(args.compare or [])) if m is not None]
    if not models:
        raise InputError("give an ONNX model to probe (with --reference, the original is probed beside it)")
    common.refuse_overwrites((args.report, args.plot), (*models, args.weights, args.preprocess, args.images))
    fmt = common.input_format(args, models[0])
    size = fmt.size() or 224
    data = load_images(
        args.images or bundled.default_images(size),
        crop=size,
        shift=0,
        pad=None if size != 32 else "zero",
        preprocess=common.preprocess(args, size),
        limit=args.count,
        fmt=fmt,
    )
    x = data.prepare(data.views())
    results = {}
    if args.reference is not None:
        # the original reads NCHW float32; the views were prepared as the first model takes them
        nchw = x.transpose(0, 3, 1, 2) if fmt.layout == "NHWC" else x
        with common.progress_bars(console) as progress:
            module = load_model(args.reference, args.weights)[0]
            results[f"reference:{args.reference}"] = probe_module(module, nchw, progress=progress)
    elif args.weights is not None:
        raise InputError("--weights goes with --reference")
    with common.progress_bars(console) as progress:
        results |= {m: probe(m, x, progress=titled(progress, f"sites of {Path(m).name}")) for m in models}
    console.print(table(results, len(x), data.source))
    if args.report:
        write_text(args.report, json.dumps(payload(results, len(x), data.source), indent=2) + "\n")
    if args.plot:
        plot_probe({Path(m).name: r for m, r in results.items()}, args.plot, f"aliasing per site ({data.source})")
    return common.EXIT_OK
