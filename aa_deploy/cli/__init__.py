"""The `aa-deploy` command line: parse, call the library, print, exit.

One module per subcommand (`add` puts its arguments on the parser, `run` does the work); what they
share is in `common`. Exit codes: 0 done, 1 nothing to do or a check failed, 2 bad input or usage.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from rich.console import Console

from aa_deploy.cli import (
    build,
    calibrate,
    consistency,
    convert,
    demo,
    export,
    inspect,
    probe,
    quantize,
    tune,
    verify,
)
from aa_deploy.cli.common import EXIT_INPUT, EXIT_NOTHING, EXIT_OK
from aa_deploy.common.errors import InputError
from aa_deploy.common.version import __version__

__all__ = ["EXIT_INPUT", "EXIT_NOTHING", "EXIT_OK", "main", "parser"]
# In the order `aa-deploy --help` lists them.
COMMANDS = (inspect, convert, export, verify, consistency, probe, quantize, build, calibrate, tune, demo)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aa-deploy", description="Anti-alias the downsampling of exported vision models.")
    p.add_argument("--version", action="version", version=f"aa-deploy {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add(sub)
    for command_parser in sub.choices.values():
        command_parser.add_argument(
            "--debug", action="store_true", help="show the full traceback when another library fails"
        )
    return p


OURS = tuple(str(Path(__file__).resolve().parents[2] / name) for name in ("aa_deploy", "calibration", "converters"))


def _raised_in(e: BaseException) -> tuple[str, str]:
    """(file, module) of the innermost frame that raised `e`."""
    frames = traceback.extract_tb(e.__traceback__)
    file = frames[-1].filename if frames else ""
    parts = Path(file).parts
    for i in reversed(range(len(parts) - 1)):  # .../lib/python3.11/site-packages/numpy/...: the innermost
        if parts[i] in ("site-packages", "dist-packages") or parts[i].startswith("python3."):
            return file, parts[i + 1].removesuffix(".py")
    return file, Path(file).stem or type(e).__module__


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # Tables need room; a pipe or CI log has no width of its own.
    console = Console(width=None if sys.stdout.isatty() else 200, soft_wrap=True)
    try:
        return args.run(args, console)
    except InputError as e:
        print(f"aa-deploy {args.command}: error: {e}", file=sys.stderr)
        return EXIT_INPUT
    except OSError as e:  # a full disk, a read-only folder, a file that went away: the machine's, not a bug
        where = f"{e.filename}: " if e.filename else ""
        print(f"aa-deploy {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return EXIT_INPUT
    except Exception as e:
        message = " ".join(str(e).split()) or type(e).__name__
        # ONNX Runtime refusing a model or its inputs is about the user's files, not a bug of ours.
        if type(e).__module__.startswith("onnxruntime") and not args.debug:
            print(f"aa-deploy {args.command}: error: ONNX Runtime: {message}", file=sys.stderr)
            return EXIT_INPUT
        # Another library failing on the user's graph: one line and a hint; a fault in our own code raises.
        file, module = _raised_in(e)
        if args.debug or file.startswith(OURS):
            raise
        print(
            f"aa-deploy {args.command}: error: {type(e).__name__} in {module}: {message[:300]} "
            f"(rerun with --debug for the traceback, and please report it)",
            file=sys.stderr,
        )
        return EXIT_INPUT
    except KeyboardInterrupt:
        print(f"aa-deploy {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
