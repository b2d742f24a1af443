"""`aa-deploy demo`: the whole chain on the bundled trained CIFAR-10 ResNet-20 and test images."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console


def add(sub) -> None:
    d = sub.add_parser("demo", help="the whole chain on the bundled trained CIFAR-10 ResNet-20 and test images")
    d.add_argument("--workdir", help="keep the exported and converted models here (default: a temporary folder)")
    d.set_defaults(run=run)


def run(args: argparse.Namespace, console: Console) -> int:
    from aa_deploy.demo import run_demo

    return run_demo(console, Path(args.workdir) if args.workdir else None)
