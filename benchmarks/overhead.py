"""Inference latency of converted vs original models: python benchmarks/overhead.py [options].

Same process, one ONNX Runtime CPU session per model with a fixed thread count, runs alternating
A B A B; the figure is the median of the per-pair ratio converted/original, with its spread (the
10th-90th percentile). Models are exported once into --workdir (224 px, dynamic batch).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import numpy as np

DEFAULT_MODELS = [
    "torchvision:resnet50",
    "torchvision:mobilenet_v3_large",
    "timm:convnext_tiny",
    "timm:swin_tiny_patch4_window7_224",
]


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def pair_ratios(a, b, x: np.ndarray, pairs: int, warmup: int = 3) -> list[float]:
    name_a, name_b = a.get_inputs()[0].name, b.get_inputs()[0].name
    for _ in range(warmup):
        a.run(None, {name_a: x})
        b.run(None, {name_b: x})
    ratios = []
    for _ in range(pairs):
        t0 = time.perf_counter()
        a.run(None, {name_a: x})
        t1 = time.perf_counter()
        b.run(None, {name_b: x})
        t2 = time.perf_counter()
        ratios.append((t2 - t1) / (t1 - t0))
    return ratios


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    p.add_argument("--modes", nargs="+", default=["pre", "blurpool"])
    p.add_argument("--filters", nargs="+", default=["rect", "triangle", "binomial"])
    p.add_argument("--pad", default="reflect")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--pairs", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", default="/tmp/aa-deploy-bench")
    p.add_argument("--json")
    args = p.parse_args()

    import aa_deploy
    from converters.export import export, load_model

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    print(
        f"{'model':36s} {'mode':9s} {'filter':9s} {'batch':>5s} {'orig ms':>8s} {'ratio':>7s} {'p10-p90':>13s}",
        flush=True,
    )
    for spec in args.models:
        original = work / (spec.replace(":", "_") + ".onnx")
        if not original.exists():
            export(load_model(spec)[0], original, (2, 3, 224, 224))
        base = session(original, args.threads)
        for mode, filt in itertools.product(args.modes, args.filters):
            converted = work / f"{original.stem}.{mode}.{filt}.{args.pad}.onnx"
            aa_deploy.convert(original, converted, aa_deploy.Options(filter=filt, mode=mode, pad=args.pad))
            conv = session(converted, args.threads)
            for batch in args.batches:
                x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)
                ratios = pair_ratios(base, conv, x, args.pairs)
                t0 = time.perf_counter()
                base.run(None, {base.get_inputs()[0].name: x})
                orig_ms = 1000 * (time.perf_counter() - t0)
                q = np.percentile(ratios, [10, 90])
                row = {
                    "model": spec,
                    "mode": mode,
                    "filter": filt,
                    "pad": args.pad,
                    "batch": batch,
                    "original_ms": round(orig_ms, 1),
                    "ratio_median": round(statistics.median(ratios), 3),
                    "ratio_p10": round(float(q[0]), 3),
                    "ratio_p90": round(float(q[1]), 3),
                    "pairs": args.pairs,
                }
                rows.append(row)
                print(
                    f"{spec:36s} {mode:9s} {filt:9s} {batch:5d} {orig_ms:8.1f} {row['ratio_median']:7.3f} "
                    f"{row['ratio_p10']:6.3f}-{row['ratio_p90']:.3f}",
                    flush=True,
                )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
