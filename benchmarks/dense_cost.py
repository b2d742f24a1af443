"""What dense sampling costs on each architecture family: python benchmarks/dense_cost.py [--workdir DIR].

Each architecture is built with random weights (cost does not depend on them), exported at 224 px the
way its row says, converted with `--dense-last N --filter none` for N = 1 and 2, and measured against
its own original: multiply-adds counted on the graphs (`convert.plan_cost`), and ONNX Runtime CPU
latency at batch 1, side by side in one process (`converters.timing.latency_ratio`: alternating runs,
median of per-pair ratios). A conversion that is refused prints its one-line reason instead.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

import aa_deploy
from aa_deploy.common import model_io
from aa_deploy.common.errors import InputError
from aa_deploy.conversion.graph_pass import plan_cost
from aa_deploy.converters.export import export, load_model
from aa_deploy.converters.onnxruntime import OnnxRuntimeRunner
from aa_deploy.converters.timing import latency_ratio

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
MODELS = [  # (name, how exported)
    ("aa:efficientnet_lite0", "torchscript"),
    ("timm:tf_efficientnet_b0", "dynamo"),
    ("timm:mobilenetv3_small_050", "dynamo"),
    ("timm:regnety_002", "dynamo"),
    ("torchvision:shufflenet_v2_x0_5", "dynamo"),
    ("timm:convnextv2_atto", "dynamo"),
    ("timm:convnext_atto", "torchscript"),
    ("zoo:densenet121", "onnx"),
]


def original(name: str, how: str, folder: Path) -> Path:
    if how == "onnx":
        return LIGHT / f"light_{name.split(':')[1]}.onnx"
    path = folder / f"{name.replace(':', '_')}.onnx"
    if not path.exists():
        model, _ = load_model(name)
        if how == "dynamo":
            export(model, path, (1, 3, 224, 224))
        else:
            torch.onnx.export(model, torch.zeros(1, 3, 224, 224), path, dynamo=False, opset_version=17)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="out/dense_cost")
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    folder = Path(args.workdir)
    folder.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore")
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    rows = []
    for name, how in MODELS:
        src = original(name, how, folder)
        base = OnnxRuntimeRunner(src, threads=args.threads)
        for n in (1, 2):
            out = folder / f"{src.stem}.d{n}.onnx"
            options = aa_deploy.Options(filter="none", dense_last=n)
            try:
                aa_deploy.convert(src, out, options)
            except InputError as e:
                rows.append({"model": name, "export": how, "dense_last": n, "refused": str(e)})
                print(f"{name:32} {how:11} dense-{n}: refused ({e})")
                continue
            macs = plan_cost(model_io.load(src), options).ratio
            latency = latency_ratio(base, OnnxRuntimeRunner(out, threads=args.threads), x, pairs=args.pairs)
            rows.append({"model": name, "export": how, "dense_last": n, "macs_ratio": macs, "latency": latency})
            print(f"{name:32} {how:11} dense-{n}: multiply-adds x{macs:.2f}, CPU latency b1 x{latency['ratio']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
