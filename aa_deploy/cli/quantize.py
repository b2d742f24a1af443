"""`aa-deploy quantize`: INT8 by explicit Q/DQ (TensorRT 10/11, ONNX Runtime), blurs kept exact."""

from __future__ import annotations

import argparse

from rich.console import Console

from aa_deploy.cli import common
from aa_deploy.common.images import preprocess_for
from aa_deploy.converters.int8 import calibration_inputs, quantize


def add(sub) -> None:
    z = sub.add_parser("quantize", help="INT8 by explicit Q/DQ (TensorRT 10/11, ONNX Runtime), blurs kept exact")
    z.add_argument("model")
    z.add_argument("--calib-images", required=True, help="folder of calibration images (recursive)")
    z.add_argument("-o", "--output", required=True)
    z.add_argument("--limit", type=int, default=500, help="use at most this many images (default 500)")
    z.add_argument("--per-tensor", action="store_true", help="per-tensor instead of per-channel weight scales")
    z.add_argument(
        "--full-range",
        action="store_true",
        help="weights on 8 bits (default 7: ONNX Runtime's int8 kernels saturate at full range on x86 CPUs "
        "without VNNI; TensorRT does not need the reduction)",
    )
    common.add_preprocess(z)
    z.set_defaults(run=run)


def run(args: argparse.Namespace, console: Console) -> int:
    common.at_least_1(args, "limit")
    common.refuse_overwrites((args.output,), (args.model, args.calib_images, args.preprocess))
    fmt = common.input_format(args, args.model)
    preprocess = preprocess_for(fmt, common.preprocess(args, fmt.size()), args.model)
    x = calibration_inputs(args.calib_images, preprocess, fmt, limit=args.limit)
    report: dict = {}
    with common.progress_bars(console) as progress:
        kept = quantize(
            args.model, args.output, x, per_channel=not args.per_tensor, report=report,
            reduce_range=not args.full_range, progress=progress,
        )  # fmt: skip
    console.print(f"shape inference before quantizing: {report['pre_process']}")
    console.print(
        f"INT8 Q/DQ ({'per-tensor' if args.per_tensor else 'per-channel'}, symmetric) calibrated on {len(x)} images; "
        f"{len(kept)} blur nodes kept exact in float; wrote {args.output}"
    )
    return common.EXIT_OK
