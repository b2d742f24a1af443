"""What several `aa-deploy` subcommands share: exit codes, option groups, preprocessing, shapes."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console

from aa_deploy.common.atomic import refuse_overwrite
from aa_deploy.common.errors import InputError, SettingError
from aa_deploy.common.images import Preprocess
from aa_deploy.common.input_format import LAYOUTS, InputFormat
from aa_deploy.common.input_format import read as read_input_format
from aa_deploy.common.progress import Advance, Progress
from aa_deploy.conversion.filters import NAMED_SIZES
from aa_deploy.conversion.plan import MODES, PADS, PHASES, Options

EXIT_OK, EXIT_NOTHING, EXIT_INPUT = 0, 1, 2


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--filter",
        choices=list(NAMED_SIZES),
        help="blur filter (default: triangle; none: no blur, e.g. with --dense-last alone)",
    )
    p.add_argument("--filter-size", type=int, metavar="N", help="binomial row of N taps, 1..7 (overrides --filter)")
    p.add_argument(
        "--mode", default="auto", choices=MODES, help="pre, blurpool, or auto: blurpool for pooling, pre elsewhere"
    )
    p.add_argument("--pad", default="reflect", choices=PADS, help="padding of the blur (default: reflect)")
    stem = p.add_mutually_exclusive_group()
    stem.add_argument(
        "--skip-stem",
        dest="skip_stem",
        action="store_true",
        default=None,
        help="leave the first downsampling site untouched (default: only when it is a strided conv on the input image)",
    )
    stem.add_argument(
        "--blur-stem",
        dest="skip_stem",
        action="store_false",
        default=None,
        help="blur the first downsampling site even when it is a strided conv on the input image",
    )
    p.add_argument("--include", metavar="REGEX", help="only sites whose node name or module scope matches")
    p.add_argument("--exclude", metavar="REGEX", help="leave out sites whose node name or module scope matches")
    p.add_argument(
        "--dense-last",
        type=int,
        default=0,
        metavar="N",
        help="dense sampling: the sites of the last N resolution levels at stride 1, every spatial op after them "
        "dilated (exact mean over the sampling phases, no training; costs compute). Default 0: off",
    )
    p.add_argument(
        "--phases",
        choices=PHASES,
        default="all",
        help="with --dense-last: average every sampling phase of the dense levels (all, the default) or only the "
        "diagonal ones, (0, 0) and (1, 1) at stride 2 (half the phases per level, about half the added compute)",
    )


def add_target_opset(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--target-opset",
        type=int,
        metavar="N",
        help="upgrade the model to opset N first (opsets below 11 are always upgraded, to 11 by default)",
    )


def print_upgrade(upgrade: dict | None, console) -> None:
    """One line saying that the input's opset was upgraded, when it was."""
    if upgrade:
        console.print(f"upgraded the graph from opset {upgrade['from']} to {upgrade['to']} (onnx.version_converter)")


def add_preprocess(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--size",
        type=image_size,
        help="image size after resize and centre crop: one side (224) or HEIGHTxWIDTH (128x192) (default: the "
        "model's input size)",
    )
    p.add_argument("--mean", help="normalization mean, e.g. 0.485,0.456,0.406 (default: ImageNet's)")
    p.add_argument("--std", help="normalization std, e.g. 0.229,0.224,0.225 (default: ImageNet's)")
    p.add_argument(
        "--preprocess",
        help="JSON file with size, resize, mean, std (without resize: each image's short side to the crop / 0.875 "
        "where it has the pixels)",
    )
    p.add_argument(
        "--layout",
        choices=LAYOUTS,
        help="the image input's layout where the graph cannot say (default: read from the graph: the axis with 1 or "
        "3 channels; NCHW when it is dynamic)",
    )


def image_size(text: str) -> int | tuple[int, int]:
    """`--size`: '224' or '128x192' (height x width)."""
    try:
        sides = [int(v) for v in text.lower().split("x")]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2) or min(sides) < 1:
        raise argparse.ArgumentTypeError(f"give one side or HEIGHTxWIDTH in pixels, e.g. 224 or 128x192, not {text!r}")
    return sides[0] if len(sides) == 1 else (sides[0], sides[1])


def preprocess(args: argparse.Namespace, default_size=None, model=None):
    """The user's preprocessing (file, or --size/--mean/--std), or None to let the command decide; without
    --size, the size is `default_size`, else `model`'s input size, else 224."""
    if args.preprocess:
        return Preprocess.from_file(args.preprocess)
    if not (args.size or args.mean or args.std):
        return None
    if not args.size and default_size is None and model is not None:
        default_size = input_format(args, model).size()
    try:
        kw: dict = {"size": args.size or default_size or 224}
        kw |= {"mean": tuple(float(v) for v in args.mean.split(","))} if args.mean else {}
        kw |= {"std": tuple(float(v) for v in args.std.split(","))} if args.std else {}
    except ValueError:
        raise InputError("--mean/--std take comma-separated numbers, one per channel (3, or 1 for grayscale)") from None
    return Preprocess(**kw)


def input_format(args: argparse.Namespace, model) -> InputFormat:
    """The model's image input as the graph (and --layout, where given) says."""
    return read_input_format(model, getattr(args, "layout", None))


def command_started() -> float:
    """The `time.perf_counter()` at which this process started (Linux: from /proc; elsewhere: now), so that a
    time limit counts the seconds spent loading the libraries too."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return time.perf_counter()
    return time.perf_counter() - max(0.0, age)


def options(args: argparse.Namespace) -> Options:
    try:
        return Options(
            args.filter or "triangle",
            args.filter_size,
            args.mode,
            args.pad,
            args.skip_stem,
            args.include,
            args.exclude,
            args.dense_last,
            args.phases,
        )
    except ValueError as e:
        raise InputError(str(e)) from None


def shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(d) for d in text.lower().replace(",", "x").split("x"))
    except ValueError:
        raise InputError(f"bad shape {text!r}: write it as 3x224x224") from None


def refuse_overwrites(outputs, inputs) -> None:
    """One line, before any work, when a file the command would write (report, plot, JUnit, model) is
    one it reads: a model or its external data, a preprocessing or labels file, an image of a folder."""
    for output in outputs:
        if output is not None:
            refuse_overwrite(output, *inputs)


def at_least_1(args: argparse.Namespace, *names: str) -> None:
    """A one-line error for a count flag below 1 (`--passes 0`, `--batch 0`, `--count 0`, `--limit 0`)."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, not {value}")


@contextmanager
def progress_bars(console: Console, other: Callable[[object], None] | None = None) -> Iterator[Progress]:
    """A `progress.Progress` receiver for the library's long-running steps: each task's `Advance` a bar (on a
    terminal; gone when the block ends), every other event handed to `other`."""
    from rich.progress import BarColumn, MofNCompleteColumn, TimeRemainingColumn
    from rich.progress import Progress as Bars

    columns = ("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Bars(*columns, console=console, transient=True, disable=not console.is_terminal) as bars:
        tasks: dict[str, int] = {}

        def receive(event: object) -> None:
            if isinstance(event, Advance):
                if event.task not in tasks:
                    tasks[event.task] = bars.add_task(event.task, total=event.total)
                bars.update(tasks[event.task], completed=event.done)
            elif other is not None:
                other(event)

        yield receive


@contextmanager
def setting_errors(args: argparse.Namespace, renamed: dict[str, str] | None = None) -> Iterator[None]:
    """The library's records check their settings: a `SettingError` raised inside becomes one line under the
    flag that gave the value (`renamed`: fields set by a flag of another name, field -> flag's dest)."""
    try:
        yield
    except SettingError as e:
        dest = (renamed or {}).get(e.setting, e.setting)
        given = getattr(args, dest, e.value)
        shown = f"{given:g}" if isinstance(given, float) else given
        raise InputError(f"--{dest.replace('_', '-')} {e.rule}, not {shown}") from None
