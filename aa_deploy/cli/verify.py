"""`aa-deploy verify`: numerical parity of an ONNX model against its PyTorch reference."""

from __future__ import annotations

import argparse
from dataclasses import replace

from rich.console import Console

from aa_deploy.cli import common
from aa_deploy.converters.backends import BACKENDS
from aa_deploy.converters.onnxruntime import PROVIDERS
from aa_deploy.verification.comparator import DEFAULT_TOLERANCE, Check, Tolerance
from aa_deploy.verification.parity import Deployed, Inputs, Reference, verify


def add(sub) -> None:
    v = sub.add_parser("verify", help="numerical parity of an ONNX model against its PyTorch reference")
    v.add_argument("model")
    v.add_argument("--reference", required=True, help="timm:NAME, torchvision:NAME, aa:NAME or package.module:factory")
    v.add_argument("--weights", help="checkpoint for the reference")
    g = v.add_mutually_exclusive_group()
    g.add_argument(
        "--antialiased",
        action="store_true",
        help="compare with the twin (default when the model records aa-deploy options)",
    )
    g.add_argument("--plain", action="store_true", help="compare with the plain model")
    g.add_argument(
        "--change",
        action="store_true",
        help="report how much conversion changed the outputs vs the plain model (never fails)",
    )
    v.add_argument("--backend", default="onnxruntime", choices=BACKENDS)
    v.add_argument("--provider", default="cpu", choices=list(PROVIDERS), help="ONNX Runtime execution provider")
    v.add_argument("--precision", default="fp32", help="fp32, fp16 or int8: picks the default tolerances")
    v.add_argument("--atol", type=float)
    v.add_argument("--rtol", type=float)
    v.add_argument("--min-top1", type=float, help="least top-1 agreement for classifier outputs")
    v.add_argument("--min-cosine", type=float, help="least per-sample cosine similarity")
    v.add_argument("--images", help="image folder, or bundled:cifar10 (default: deterministic random inputs)")
    v.add_argument(
        "--count", type=int, default=8, help="number of inputs (random) or at most this many images (0: all)"
    )
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--input-shape", metavar="CxHxW", help="for models with dynamic spatial dims")
    common.add_preprocess(v)
    v.add_argument("--report", help="write the JSON report here")
    v.add_argument("--junit", help="write a JUnit XML file here")
    common.add_options(v)
    v.set_defaults(run=run)


def run(args: argparse.Namespace, console: Console) -> int:
    common.refuse_overwrites((args.report, args.junit), (args.model, args.weights, args.preprocess, args.images))
    options = common.options(args) if args.antialiased and (args.filter or args.filter_size) else None
    antialiased = True if args.antialiased else (False if args.plain else None)
    preprocess = common.preprocess(args, model=args.model if args.backend != "tensorrt" else None)
    with common.setting_errors(args):
        check = Check("change" if args.change else "parity", args.precision, _tolerance(args))
        inputs = Inputs(args.images, preprocess, args.count, args.seed, common.shape(args.input_shape), args.layout)
    reference = Reference(args.reference, args.weights, antialiased, options)
    result = verify(args.model, reference, inputs, check, Deployed(args.backend, args.provider))
    console.print(result)
    if args.report:
        result.write_json(args.report)
    if args.junit:
        result.write_junit(args.junit)
    return common.EXIT_OK if result.passed else common.EXIT_NOTHING


def _tolerance(args: argparse.Namespace) -> Tolerance | None:
    """The precision's default tolerance with the bounds given on the command line put in (None: none given)."""
    given = {"atol": args.atol, "rtol": args.rtol, "min_top1": args.min_top1, "min_cosine": args.min_cosine}
    base = DEFAULT_TOLERANCE.get(args.precision)
    if base is None or all(v is None for v in given.values()):
        return None
    return replace(base, **{k: v for k, v in given.items() if v is not None})
