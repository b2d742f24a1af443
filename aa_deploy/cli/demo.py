"""`aa-deploy demo`: the whole chain on the bundled trained CIFAR-10 ResNet-20 and test images."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from aa_deploy.cli.demo_steps import CALIBRATION_CROPS, run_demo
from aa_deploy.common.errors import InputError


def add(sub) -> None:
    d = sub.add_parser("demo", help="the whole chain on the bundled trained CIFAR-10 ResNet-20 and test images")
    d.add_argument(
        "--workdir",
        default="aa-deploy-demo",
        help="where the models and the two figures (aliasing.png, diagonal.png) are written (default %(default)s)",
    )
    d.add_argument(
        "--crops",
        type=int,
        default=None,
        help="calibrate on this many photo crops (default 1000, about 25 s here with the rest of the demo)",
    )
    d.set_defaults(run=run)


def run(args: argparse.Namespace, console: Console) -> int:
    if args.crops is not None and args.crops < 20:
        raise InputError("--crops: calibration needs 20 images or more")
    return run_demo(console, Path(args.workdir), args.crops or CALIBRATION_CROPS)
