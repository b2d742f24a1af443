"""The `aa-deploy` command line: parse, call the library, print, exit.

Exit codes: 0 done, 1 nothing to do or a check failed, 2 bad input or usage.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rich.console import Console

from aa_deploy.errors import InputError
from aa_deploy.plan import MODES, PADS, Options
from aa_deploy.version import __version__

EXIT_OK, EXIT_NOTHING, EXIT_INPUT = 0, 1, 2


def _add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--filter", default="triangle", choices=["rect", "triangle", "binomial"], help="blur filter (default: triangle)"
    )
    p.add_argument("--filter-size", type=int, metavar="N", help="binomial row of N taps, 1..7 (overrides --filter)")
    p.add_argument(
        "--mode", default="auto", choices=MODES, help="pre, blurpool, or auto: blurpool for pooling, pre elsewhere"
    )
    p.add_argument("--pad", default="reflect", choices=PADS, help="padding of the blur (default: reflect)")
    p.add_argument("--skip-stem", action="store_true", help="leave the first downsampling site untouched")
    p.add_argument("--include", metavar="REGEX", help="only sites whose node name or module scope matches")
    p.add_argument("--exclude", metavar="REGEX", help="leave out sites whose node name or module scope matches")


def _options(args: argparse.Namespace) -> Options:
    try:
        return Options(args.filter, args.filter_size, args.mode, args.pad, args.skip_stem, args.include, args.exclude)
    except ValueError as e:
        raise InputError(str(e)) from None


def _inspect(args: argparse.Namespace, console: Console) -> int:
    from aa_deploy import model_io
    from aa_deploy.convert import inspect
    from aa_deploy.report import print_sites

    actions = inspect(model_io.load(args.model), _options(args))
    if args.json:
        print(json.dumps([a.describe() for a in actions], indent=2))
    elif not actions:
        console.print(f"{args.model}: no downsampling sites found")
    else:
        print_sites(
            actions,
            f"{args.model}: {len(actions)} sites, {sum(a.action != 'skip' for a in actions)} to change",
            console,
        )
    return EXIT_OK if actions else EXIT_NOTHING


def _convert(args: argparse.Namespace, console: Console) -> int:
    from aa_deploy.convert import convert
    from aa_deploy.report import print_sites

    if args.output is None and not args.in_place:
        raise InputError("give an output file with -o FILE (or --in-place to overwrite the input)")
    start = time.perf_counter()
    result = convert(args.model, args.output, _options(args), in_place=args.in_place, check=not args.no_check)
    seconds = time.perf_counter() - start
    out = args.model if args.in_place else args.output
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
    return EXIT_OK


def _demo(args: argparse.Namespace, console: Console) -> int:
    from aa_deploy.demo import run_demo

    return run_demo(console, Path(args.workdir) if args.workdir else None)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aa-deploy", description="Anti-alias the downsampling of exported vision models.")
    p.add_argument("--version", action="version", version=f"aa-deploy {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("inspect", help="list every downsampling site and what convert would do")
    q.add_argument("model")
    q.add_argument("--json", action="store_true", help="print the plan as JSON")
    _add_options(q)
    q.set_defaults(run=_inspect)

    c = sub.add_parser("convert", help="insert blur nodes at the downsampling sites of an ONNX model")
    c.add_argument("model")
    c.add_argument("-o", "--output", help="output ONNX file (written atomically)")
    c.add_argument("--in-place", action="store_true", help="overwrite the input model")
    c.add_argument("--no-check", action="store_true", help="skip onnx.checker on the output")
    c.add_argument("-q", "--quiet", action="store_true", help="no site table")
    _add_options(c)
    c.set_defaults(run=_convert)

    d = sub.add_parser("demo", help="the whole chain on the bundled trained CIFAR-10 ResNet-20 and test images")
    d.add_argument("--workdir", help="keep the exported and converted models here (default: a temporary folder)")
    d.set_defaults(run=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # Tables need room; a pipe or CI log has no width of its own.
    console = Console(width=None if sys.stdout.isatty() else 200, soft_wrap=True)
    try:
        return args.run(args, console)
    except InputError as e:
        print(f"aa-deploy {args.command}: error: {e}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
