"""`aa-deploy build`: TensorRT engine from an ONNX model (precision put into the graph first)."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from aa_deploy.cli import common
from aa_deploy.common.errors import InputError
from aa_deploy.common.images import preprocess_for
from aa_deploy.common.input_format import from_dims
from aa_deploy.common.model_io import input_spec
from aa_deploy.converters.int8 import calibration_inputs, quantize
from aa_deploy.converters.precision import to_fp16
from aa_deploy.converters.tensorrt import build_engine, parse_shapes


def add(sub) -> None:
    b = sub.add_parser("build", help="TensorRT engine from an ONNX model (precision put into the graph first)")
    b.add_argument("model")
    b.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"])
    b.add_argument(
        "--shapes",
        help="NAME:MIN,OPT,MAX shapes, e.g. input:1x3x224x224,8x3x224x224,32x3x224x224 "
        "(default for a model whose input shape is fully static: that shape)",
    )
    b.add_argument("--calib-images", help="calibration images for --precision int8")
    b.add_argument("--limit", type=int, default=500, help="at most this many calibration images")
    b.add_argument("--timing-cache", help="TensorRT timing cache file (read and updated)")
    b.add_argument("-o", "--output", required=True, help="the engine file (a .json sidecar is written beside it)")
    common.add_preprocess(b)
    b.set_defaults(run=run)


def run(args: argparse.Namespace, console: Console) -> int:
    if args.shapes is None:
        name, dims = input_spec(args.model)
        if not all(isinstance(d, int) and d > 0 for d in dims):
            raise InputError(f"the model's input {name} has dynamic dims {dims}: give --shapes NAME:MIN,OPT,MAX")
        args.shapes = f"{name}:{'x'.join(map(str, dims))}"
    shapes = parse_shapes(args.shapes)
    out = Path(args.output)
    graph = Path(args.model)
    if args.precision == "fp16":
        graph = out.with_suffix(".fp16.onnx")
        kept = to_fp16(args.model, graph)
        console.print(f"FP16 graph ({len(kept)} blurs kept in float32 to stay exact) -> {graph}")
    elif args.precision == "int8":
        if not args.calib_images:
            raise InputError("--precision int8 needs --calib-images DIR")

        graph = out.with_suffix(".int8.onnx")
        _, _, dtype = input_spec(args.model, with_type=True)
        fmt = from_dims(list(next(iter(shapes.values()))[1]), dtype, args.layout, args.model)  # the opt shape
        preprocess = preprocess_for(fmt, common.preprocess(args, fmt.size()), args.model)
        x = calibration_inputs(args.calib_images, preprocess, fmt, limit=args.limit)
        quantize(args.model, graph, x)
        console.print(f"INT8 Q/DQ graph calibrated on {len(x)} images -> {graph}")
    try:
        sidecar = build_engine(graph, out, shapes, args.precision, args.timing_cache)
    except InputError as e:
        ready = f"; the {args.precision} graph is ready at {graph}" if graph != Path(args.model) else ""
        raise InputError(f"{e}{ready}") from None
    console.print(f"TensorRT {sidecar.tensorrt_version} engine ({args.precision}) -> {out}, sidecar {out}.json")
    return common.EXIT_OK
