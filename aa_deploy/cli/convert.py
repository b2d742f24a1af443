"""`aa-deploy convert`: insert blur nodes at the downsampling sites of an ONNX model."""

from __future__ import annotations

import argparse
import time

from rich.console import Console

from aa_deploy.cli import common
from aa_deploy.errors import InputError


def add(sub) -> None:
    c = sub.add_parser("convert", help="insert blur nodes at the downsampling sites of an ONNX model")
    c.add_argument("model")
    c.add_argument("-o", "--output", help="output ONNX file (written atomically)")
    c.add_argument("--in-place", action="store_true", help="overwrite the input model")
    c.add_argument("--no-check", action="store_true", help="skip onnx.checker on the output")
    c.add_argument("-q", "--quiet", action="store_true", help="no site table")
    common.add_target_opset(c)
    common.add_options(c)
    c.set_defaults(run=run)


def run(args: argparse.Namespace, console: Console) -> int:
    from aa_deploy.convert import convert
    from aa_deploy.report import print_sites

    if args.output is None and not args.in_place:
        raise InputError("give an output file with -o FILE (or --in-place to overwrite the input)")
    start = time.perf_counter()
    result = convert(
        args.model,
        args.output,
        common.options(args),
        in_place=args.in_place,
        check=not args.no_check,
        target_opset=args.target_opset,
    )
    seconds = time.perf_counter() - start
    out = args.model if args.in_place else args.output
    common.print_upgrade(result.opset_upgrade, console)
    if not args.quiet:
        print_sites(result.actions, f"{args.model} -> {out}", console)
    changed = len(result.changed)
    if result.blurs == 0:
        console.print(
            f"nothing added: none of the {len(result.actions)} sites needed a blur (see the table); wrote {out}"
        )
    else:
        console.print(
            f"changed {changed} of {len(result.actions)} sites with {result.blurs} blur nodes "
            f"in {seconds:.2f} s; wrote {out}"
        )
    return common.EXIT_OK
