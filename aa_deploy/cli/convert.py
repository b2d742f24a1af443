"""`aa-deploy convert`: insert blur nodes at the downsampling sites of an ONNX model."""

from __future__ import annotations

import argparse
import tempfile
import time
from functools import partial
from pathlib import Path

from rich.console import Console

from aa_deploy.calibration.calibrate import Compute, Data, Training, calibrate_to_file
from aa_deploy.calibration.report import CalibrationReport
from aa_deploy.cli import common, events
from aa_deploy.common import model_io
from aa_deploy.common.atomic import refuse_overwrite
from aa_deploy.common.devices import DEVICES
from aa_deploy.common.errors import InputError
from aa_deploy.common.images import list_images
from aa_deploy.conversion.graph_pass import Conversion, convert, save_converted
from aa_deploy.conversion.report import print_sites
from aa_deploy.verification.drift import Drift, output_drift


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
        refuse_overwrite(args.output, args.model, args.calibrate)
        list_images(args.calibrate)  # a missing or empty folder fails before anything is written


def run(args: argparse.Namespace, console: Console) -> int:
    _check(args)
    if args.calibrate is not None:
        return _convert_and_calibrate(args, console)
    start = time.perf_counter()
    out = args.model if args.in_place else args.output
    result = convert(
        args.model,
        out,
        common.options(args),
        in_place=args.in_place,
        check=not args.no_check,
        target_opset=args.target_opset,
    )
    if _summarize(args, result, out, time.perf_counter() - start, console):
        drift = _drift(args, out, console)
        if drift is not None:
            _advise(args, out, result.blurs, _dense(result), drift, console)
    return common.EXIT_OK


def _convert_and_calibrate(args: argparse.Namespace, console: Console) -> int:
    """The graph pass, then calibration, on the model in memory (`convert`'s result, `calibrate_to_file`);
    the converted graph is written once, to a temporary folder and checked as convert checks its output, for
    ONNX Runtime to run: the drift on bundled images and calibration's check of its own execution read it."""
    start = time.perf_counter()
    out = Path(args.output)
    with tempfile.TemporaryDirectory(prefix="aa-deploy-convert-") as tmp:
        written = Path(tmp) / out.name
        result = convert(
            args.model, written, common.options(args), check=not args.no_check, target_opset=args.target_opset
        )
        model = result.model
        if not _summarize(args, result, out, time.perf_counter() - start, console, calibrating=True):
            external = model_io.uses_external_data(model)
            save_converted(model, args.model, out, external=external, check=not args.no_check)
            return common.EXIT_OK
        drift = _drift(args, written, console)
        if drift is not None:
            console.print(f"before calibration: {drift.describe()}")
        data = Data(args.calibrate, preprocess=common.preprocess(args, model=written))
        with common.progress_bars(console, partial(events.show, console)) as progress:
            calibrated = calibrate_to_file(
                model, args.model, data, out, Training(), Compute(device=args.device),
                name=f"{args.model} converted", source=written, progress=progress, started=common.command_started(),
            )  # fmt: skip
    console.print(CalibrationReport(calibrated, out))
    return common.EXIT_OK


def _dense(result: Conversion) -> int:
    return sum(a.action == "dense" for a in result.actions)


def _summarize(
    args: argparse.Namespace, result: Conversion, out, seconds: float, console: Console, calibrating: bool = False
) -> bool:
    """The sites table and what changed; False where nothing did (then the output is the input, written)."""
    common.print_upgrade(result.opset_upgrade, console)
    if not args.quiet:
        print_sites(result.actions, f"{args.model} -> {out}", console)
    dense = _dense(result)
    if result.blurs == 0 and not dense:
        console.print(
            f"nothing added: none of the {len(result.actions)} sites needed a blur (see the table); wrote {out}"
        )
        return False
    console.print(
        f"changed {len(result.changed)} of {len(result.actions)} sites with {result.blurs} blur nodes"
        + (f" and {dense} dense" if dense else "")
        + f" in {seconds:.2f} s"
        + ("" if calibrating else f"; wrote {out}")
    )
    return True


def _drift(args: argparse.Namespace, converted, console: Console) -> Drift | None:
    """How far the conversion moved the outputs on bundled images (advisory: None where not compared)."""
    if args.no_drift:
        return None
    try:
        return output_drift(args.model, converted, common.preprocess(args))
    except Exception as e:  # noqa: BLE001 - advisory: the converted file is written and checked already
        console.print(f"outputs not compared with the original's ({str(e).splitlines()[0][:200]})")
        return None


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
