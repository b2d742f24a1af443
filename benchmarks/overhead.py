"""Inference latency of converted vs original models: python benchmarks/overhead.py [options].

Same process, one runner per model, runs alternating A B A B; each side of a pair is the shortest
of --reps back-to-back runs (the least disturbed by other load); the figure is the median of the
per-pair ratio converted/original, with its spread (the 10th-90th percentile). Models are exported
once into --workdir (224 px, dynamic batch).

Backends (--backend): ort-cpu (default; ONNX Runtime CPU with --threads intra-op threads),
ort-cuda and ort-tensorrt (ONNX Runtime's CUDA / TensorRT providers, onnxruntime-gpu), tensorrt
(an engine per model and batch built by `converters.tensorrt`, fp32 or --precision fp16 put into
the graph; timed through polygraphy's runner, host copies included). A backend that is not there
stops the script with one line saying what is missing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

import numpy as np

from aa_deploy.converters.timing import pair_ratios

DEFAULT_MODELS = [
    "torchvision:resnet50",
    "torchvision:mobilenet_v3_large",
    "timm:convnext_tiny",
    "timm:swin_tiny_patch4_window7_224",
]


BACKENDS = ("ort-cpu", "ort-cuda", "ort-tensorrt", "tensorrt")


def with_precision(path: Path, backend: str, precision: str) -> Path:
    """The graph to run: `path`, or its float16 version for the tensorrt backend at --precision fp16."""
    if backend != "tensorrt" or precision == "fp32":
        return path
    from aa_deploy.converters.precision import to_fp16

    graph = path.with_suffix(".fp16.onnx")
    to_fp16(path, graph)
    return graph


def make_runner(graph: Path, backend: str, threads: int, batch: int, precision: str):
    """A runner (`run(feeds)`, `input_names`) of `graph` on `backend`, for inputs of `batch` images."""
    if backend.startswith("ort-"):
        from aa_deploy.converters.onnxruntime import OnnxRuntimeRunner

        return OnnxRuntimeRunner(graph, backend.removeprefix("ort-"), threads)
    import onnx

    from aa_deploy.converters.tensorrt import TensorRTRunner, build_engine

    name = onnx.load(str(graph), load_external_data=False).graph.input[0].name
    engine = graph.with_suffix(f".b{batch}.engine")  # x.b8.engine, x.fp16.b8.engine
    build_engine(graph, engine, {name: ((batch, 3, 224, 224),) * 3}, precision)
    return TensorRTRunner(engine)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    p.add_argument("--modes", nargs="+", default=["pre", "blurpool"])
    p.add_argument("--filters", nargs="+", default=["rect", "triangle", "binomial"])
    p.add_argument("--pads", nargs="+", default=["reflect"], choices=["reflect", "replicate", "zero"])
    p.add_argument(
        "--stem", nargs="+", default=["keep"], choices=["keep", "skip"], help="skip: leave the first site alone"
    )
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--pairs", type=int, default=15)
    p.add_argument("--reps", type=int, default=3, help="runs per side of a pair; the shortest counts")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads (ort-cpu)")
    p.add_argument("--backend", default="ort-cpu", choices=BACKENDS)
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16"], help="tensorrt backend only")
    p.add_argument("--workdir", default="/tmp/aa-deploy-bench")
    p.add_argument("--json")
    args = p.parse_args()
    if args.backend == "tensorrt":
        from aa_deploy.converters.tensorrt import require_tensorrt

        require_tensorrt()
    else:
        from aa_deploy.converters.onnxruntime import available_provider

        available_provider(args.backend.removeprefix("ort-"))

    import aa_deploy
    from aa_deploy.converters.export import export, load_model

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    print(
        f"{'model':36s} {'mode':9s} {'filter':9s} {'pad':8s} {'stem':5s} {'batch':>5s} {'orig ms':>8s} {'ratio':>7s} {'p10-p90':>13s}",
        flush=True,
    )
    for spec in args.models:
        original = work / (spec.replace(":", "_") + ".onnx")
        if not original.exists():
            export(load_model(spec)[0], original, (2, 3, 224, 224))
        base = {}  # batch -> runner of the original, shared by every converted variant
        original_graph = with_precision(original, args.backend, args.precision)
        for mode, filt, pad, stem in itertools.product(args.modes, args.filters, args.pads, args.stem):
            converted = work / f"{original.stem}.{mode}.{filt}.{pad}.{stem}-stem.onnx"
            options = aa_deploy.Options(filter=filt, mode=mode, pad=pad, skip_stem=stem == "skip")
            aa_deploy.convert(original, converted, options)
            converted_graph = with_precision(converted, args.backend, args.precision)
            for batch in args.batches:
                if batch not in base:
                    base[batch] = make_runner(original_graph, args.backend, args.threads, batch, args.precision)
                conv = make_runner(converted_graph, args.backend, args.threads, batch, args.precision)
                x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)
                ratios, orig_ms = pair_ratios(base[batch], conv, x, args.pairs, args.reps)
                q = np.percentile(ratios, [10, 90])
                row = {
                    "model": spec,
                    "backend": args.backend,
                    "precision": args.precision if args.backend == "tensorrt" else "fp32",
                    "mode": mode,
                    "filter": filt,
                    "pad": pad,
                    "stem": stem,
                    "batch": batch,
                    "original_ms": round(orig_ms, 1),
                    "ratio_median": round(statistics.median(ratios), 3),
                    "ratio_p10": round(float(q[0]), 3),
                    "ratio_p90": round(float(q[1]), 3),
                    "pairs": args.pairs,
                    "reps": args.reps,
                }
                rows.append(row)
                print(
                    f"{spec:36s} {mode:9s} {filt:9s} {pad:8s} {stem:5s} {batch:5d} {orig_ms:8.1f} {row['ratio_median']:7.3f} "
                    f"{row['ratio_p10']:6.3f}-{row['ratio_p90']:.3f}",
                    flush=True,
                )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    from aa_deploy.common.errors import InputError

    try:
        main()
    except (InputError, RuntimeError) as e:  # a backend or package that is not here: one line, exit 2
        print(f"overhead: {e}", file=sys.stderr)
        sys.exit(2)
