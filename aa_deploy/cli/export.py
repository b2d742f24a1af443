"""`aa-deploy export`: export a PyTorch model to ONNX (torch.onnx dynamo exporter)."""

from __future__ import annotations

import argparse

from rich.console import Console

from aa_deploy.cli import common
from aa_deploy.converters.export import export, load_model


def add(sub) -> None:
    e = sub.add_parser("export", help="export a PyTorch model to ONNX (torch.onnx dynamo exporter)")
    e.add_argument(
        "model",
        help="timm:NAME, torchvision:NAME, aa:cifar10_resnet20|32, aa:efficientnet_lite0|2 or package.module:factory",
    )
    e.add_argument("-o", "--output", required=True)
    e.add_argument("--weights", help="checkpoint (state_dict) to load; without it the weights are random")
    e.add_argument("--input-shape", metavar="CxHxW", help="input shape without batch (default 3x224x224)")
    e.add_argument("--static-batch", action="store_true", help="no dynamic batch axis")
    e.add_argument("--opset", type=int, default=18)
    e.set_defaults(run=run)


def run(args: argparse.Namespace, console: Console) -> int:
    model, trained = load_model(args.model, args.weights)
    cifar = args.model.startswith("aa:cifar10")
    shape = common.shape(args.input_shape) or ((3, 32, 32) if cifar else (3, 224, 224))
    export(model, args.output, (2, *shape), dynamic_batch=not args.static_batch, opset=args.opset)
    weights = "trained weights" if trained else "RANDOM weights (no --weights given; seeded, so verify rebuilds them)"
    console.print(
        f"exported {args.model} with {weights}, input N x {'x'.join(map(str, shape))}, "
        f"opset {args.opset} -> {args.output}"
    )
    return common.EXIT_OK
