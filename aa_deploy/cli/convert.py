"""`aa-deploy convert`: insert blur nodes at the downsampling sites of an ONNX model."""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from rich.console import Console

from aa_deploy.calibration.calibrate import Compute, Data, Training
from aa_deploy.cli import calibrate as calibrate_cli
from aa_deploy.cli import common
from aa_deploy.common.atomic import refuse_overwrite
from aa_deploy.common.devices import DEVICES
from aa_deploy.common.errors import InputError
from aa_deploy.common.images import list_images
from aa_deploy.conversion.graph_pass import convert
from aa_deploy.conversion.report import print_sites
from aa_deploy.verification.drift import output_drift


def add(sub) -> None:
    c = sub.add_parser("convert", help="insert blur nodes at the downsampling sites of an ONNX model")
    c.add_argument("model")
    c.add_argument("-o", "--output", help="output ONNX file (written atomically)")
    c.add_argument("--in-place", action="store_true", help="overwrite the input model")
    c.add_argument("--no-check", action="store_true", help="skip onnx.checker on the output")
    c.add_argument("-q", "--quiet", action="store_true", help="no site table")
    c.add_argument(
        "--no-drift", action="store_true", help="skip comparing the outputs with the original's on bundled images"
    )
    c.add_argument(
        "--calibrate",
        metavar="DIR",
        help="then calibrate on the unlabeled images in DIR against the input model (aa-deploy calibrate's defaults)",
    )
    c.add_argument("--device", default="auto", choices=DEVICES, help="for --calibrate")
    common.add_target_opset(c)
    common.add_options(c)
    common.add_preprocess(c)
    c.set_defaults(run=run)


def _check(args: argparse.Namespace) -> None:
    """The arguments' one-line refusals, before anything is read or written."""
    if args.output is None and not args.in_place:
        raise InputError("give an output file with -o FILE (or --in-place to overwrite the input)")
    if args.calibrate is not None and args.in_place:
        raise InputError("--calibrate writes a new file: give -o FILE instead of --in-place")
    if args.calibrate is not None:
        refuse_overwrite(args.output, args.model)  # the converted graph goes elsewhere first: check here

        list_images(args.calibrate)  # a missing or empty folder fails before anything is written


def run(args: argparse.Namespace, console: Console) -> int:
    _check(args)
    start = time.perf_counter()
    out = args.model if args.in_place else args.output
    target = out
    if args.calibrate is not None:  # the converted graph goes to a temporary file beside the output first
        handle, target = tempfile.mkstemp(suffix=".aa.onnx", dir=Path(out).resolve().parent)
        os.close(handle)
    try:
        result = convert(
            args.model,
            target,
            common.options(args),
            in_place=args.in_place,
            check=not args.no_check,
            target_opset=args.target_opset,
        )
        seconds = time.perf_counter() - start
        common.print_upgrade(result.opset_upgrade, console)
        if not args.quiet:
            print_sites(result.actions, f"{args.model} -> {out}", console)
        changed = len(result.changed)
        dense = sum(a.action == "dense" for a in result.actions)
        if result.blurs == 0 and not dense:
            console.print(
                f"nothing added: none of the {len(result.actions)} sites needed a blur (see the table); wrote {out}"
            )
            if args.calibrate is not None:
                os.replace(target, out)
            return common.EXIT_OK
        console.print(
            f"changed {changed} of {len(result.actions)} sites with {result.blurs} blur nodes"
            + (f" and {dense} dense" if dense else "")
            + f" in {seconds:.2f} s"
            + ("" if args.calibrate else f"; wrote {out}")
        )
        drift = None
        if not args.no_drift:
            try:
                drift = output_drift(args.model, target, common.preprocess(args))
            except Exception as e:  # noqa: BLE001 - advisory: the converted file is written and checked already
                console.print(f"outputs not compared with the original's ({str(e).splitlines()[0][:200]})")
        if drift is not None and args.calibrate is None:
            _advise(args, out, result.blurs, dense, drift, console)
        if args.calibrate is not None:
            if drift is not None:
                console.print(f"before calibration: {drift.describe()}")
            data = Data(args.calibrate, preprocess=common.preprocess(args, model=target))
            return calibrate_cli.calibrate_and_report(
                target, args.model, out, data, Training(), Compute(device=args.device), console
            )
    finally:
        if target != out and os.path.exists(target):
            os.unlink(target)
    return common.EXIT_OK


def _advise(args: argparse.Namespace, out: str, blurs: int, dense: int, drift, console: Console) -> None:
    """What the moved outputs mean for a converted model that is not calibrated here."""
    if blurs == 0:  # dense sampling alone: nothing to calibrate
        console.print(
            "dense sampling: the original averaged over the "
            + ("" if args.phases == "all" else f"{args.phases} ")
            + f"sampling phases of {dense} sites, exactly and "
            f"without training; answers change where the phases disagree ({drift.describe()}). "
            f"Measure it on your images: aa-deploy consistency {args.model} --compare {out} --images DIR "
            "--require 'top1>=-0.5' --require 'consistency.lower>=0'"
        )
    elif drift.needs_calibration:
        console.print(
            f"[yellow]outputs moved: {drift.describe()}. Blurs change what the trained layers see: "
            f"calibrate it (aa-deploy calibrate {out} --teacher {args.model} --images DIR -o ...), "
            "or convert with --calibrate DIR[/yellow]"
        )
    else:
        console.print(f"outputs close to the original's: {drift.describe()}")
