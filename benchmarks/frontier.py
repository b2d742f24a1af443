"""The frontier a user chooses from: accuracy, shift consistency and cost of each model against the original.

    python benchmarks/frontier.py ORIGINAL.onnx --models A.onnx B.onnx --images DIR --labels DIR/labels.csv \
        --preprocess pre.json [--passes 5] [--steps 8] [--json out.json] [--plot out.png]
    python benchmarks/frontier.py --combine out.png Lite0=lite0.json,cal.json:cal=blur+calibrate Lite2=lite2.json  # one plot

For every model, paired against the original on the same images and views (95 % intervals from a
bootstrap over images, `aa_deploy.consistency.paired`):
- top-1 on the centre crop (the standard evaluation view);
- random-crop consistency (Zhang 2019: two crops of the resize canvas, `--passes` pairs per image);
- one-pixel consistency: one-pixel diagonal steps at `--steps` positions per image;
- multiply-adds from the graph (`aa_deploy.conversion.cost`) and ONNX Runtime CPU latency against the original's
  at batch 1 and 8 (alternating runs, median of the per-pair ratios; `benchmarks/overhead.py`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from aa_deploy.common import model_io
from aa_deploy.common.images import Preprocess
from aa_deploy.common.input_format import read as read_input_format
from aa_deploy.consistency import compare, sides
from aa_deploy.consistency.paired import bootstrap_ci, paired_difference
from aa_deploy.consistency.plots import plot_frontier
from aa_deploy.conversion import cost, fold
from aa_deploy.converters.onnxruntime import OnnxRuntimeRunner
from aa_deploy.converters.timing import pair_ratios


def combine(argv: list[str]) -> None:
    """--combine OUT.png NAME=RUN.json[,RUN.json[:ROW[=LABEL]]] ...: one plot of several runs' --json output,
    one colour per NAME; a run's `:ROW` takes that model's row alone (labelled LABEL), each model once."""
    out, *runs = argv
    families = {}
    for run in runs:
        name, _, paths = run.partition("=")
        rows = {}
        for part in paths.split(","):
            path, _, only = part.partition(":")
            only, _, label = only.partition("=")
            for row in json.loads(Path(path).read_text())["rows"]:
                if not only or row["name"] == only:
                    rows.setdefault(row["name"], {**row, "name": label or row["name"]})
        families[name] = list(rows.values())
    plot_frontier(families, out)


def top1(models: list[str], args) -> dict[str, np.ndarray]:
    """Each model's per-image correctness on the centre crop."""
    pre = Preprocess.from_file(args.preprocess) if args.preprocess else None
    fmt = read_input_format(models[0])
    data = compare.load_images(
        args.images, crop=fmt.size(), shift=0, pad=None, preprocess=pre, labels=args.labels, fmt=fmt, limit=args.limit
    )
    out = {}
    for m in models:
        runner = OnnxRuntimeRunner(m, "cpu", args.threads)
        logits = np.concatenate(
            [
                runner.run({runner.input_names[0]: data.prepare(data.images[i : i + 32])})[0]
                for i in range(0, len(data.images), 32)
            ]
        )
        out[m] = (logits.argmax(1) == data.labels).astype(np.float64)
    return out


def latency(original: str, model: str, batch: int, size: tuple[int, ...], args) -> tuple[float, float]:
    """(median ratio model/original, original's median ms) at `batch`."""
    a, b = OnnxRuntimeRunner(original, "cpu", args.threads), OnnxRuntimeRunner(model, "cpu", args.threads)
    x = np.random.default_rng(0).standard_normal((batch, *size), dtype=np.float32)
    ratios, ms = pair_ratios(a, b, x, args.pairs, args.reps)
    return statistics.median(ratios), ms


def _folded(model):
    """The model with its constant subgraphs folded: maps after pads the exporter computes at run time
    get static shapes, so their multiply-adds count."""
    fold.fold_constants(model)
    return model


def main() -> None:
    if sys.argv[1:2] == ["--combine"]:
        return combine(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("original")
    p.add_argument("--models", nargs="+", required=True)
    p.add_argument("--names", nargs="+", help="row labels (default: file names)")
    p.add_argument("--images", required=True)
    p.add_argument("--labels")
    p.add_argument("--preprocess")
    p.add_argument("--pad", choices=["zero", "reflect", "replicate"], help="pad-and-crop views (32-px images)")
    p.add_argument("--passes", type=int, default=5)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--pairs", type=int, default=7, help="latency: alternating pairs per batch size")
    p.add_argument("--reps", type=int, default=3, help="latency: runs per side of a pair; the shortest counts")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--limit", type=int)
    p.add_argument("--json")
    p.add_argument("--plot")
    args = p.parse_args()
    models = [args.original, *args.models]
    names = ["original", *(args.names or [Path(m).name for m in args.models])]
    pre = Preprocess.from_file(args.preprocess) if args.preprocess else None
    start = time.perf_counter()
    correct = top1(models, args)
    protocols = {}
    for protocol, shift in (("random-crop", None), ("one-pixel", args.steps)):
        measurement = compare.Measurement(protocol, shift, passes=args.passes, pad=args.pad)
        images = compare.Images(args.images, pre, args.limit, args.labels)
        protocols[protocol], _ = sides.measure_models(sides.Models(tuple(models)), measurement, images)
    size = tuple(model_io.input_spec(args.original)[1][1:])
    macs = {m: cost.multiply_adds(cost.with_shapes(_folded(cost.batch_of_one(model_io.load(m)))))[0] for m in models}
    rows = []
    for name, m in zip(names, models):
        row = {"name": name, "model": m, "multiply_adds": macs[m], "macs_ratio": macs[m] / macs[args.original]}
        acc = correct[m]
        row["top1"] = float(acc.mean())
        # per image, so that any two rows can be paired afterwards (the rows pair each with the original)
        row["per_image"] = {"top1": acc.tolist()} | {p: list(r[m].per_image) for p, r in protocols.items()}
        for protocol, results in protocols.items():
            row[protocol] = results[m].consistency
        if m != args.original:
            diff = acc - correct[args.original]
            row["top1_diff"] = (float(diff.mean()), bootstrap_ci(diff))
            for protocol, results in protocols.items():
                delta = paired_difference(results[args.original], results[m])
                row[f"{protocol}_diff"] = (delta.delta, delta.ci95)
            for batch in (1, 8):
                ratio, ms = latency(args.original, m, batch, size, args)
                row[f"latency_ratio_b{batch}"], row[f"original_ms_b{batch}"] = ratio, ms
        rows.append(row)
    images = len(correct[args.original])

    def pct(v: tuple | None) -> str:
        return "" if v is None else f"{100 * v[0]:+.1f} ({100 * v[1][0]:+.1f} to {100 * v[1][1]:+.1f})"

    print(f"{images} images; {time.perf_counter() - start:.0f} s")
    print(
        "| model | top-1 % | vs original | random-crop % | vs original | one-pixel % | vs original | multiply-adds | latency b1 | latency b8 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lat = [f"x{r[k]:.2f}" if k in r else "" for k in ("latency_ratio_b1", "latency_ratio_b8")]
        print(
            f"| {r['name']} | {100 * r['top1']:.1f} | {pct(r.get('top1_diff'))} | {100 * r['random-crop']:.1f} | "
            f"{pct(r.get('random-crop_diff'))} | {100 * r['one-pixel']:.1f} | {pct(r.get('one-pixel_diff'))} | "
            f"{r['multiply_adds'] / 1e6:,.0f} M (x{r['macs_ratio']:.2f}) | {lat[0]} | {lat[1]} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"images": images, "rows": rows}, indent=2))
    if args.plot:
        plot_frontier({Path(args.original).stem: rows}, args.plot)


if __name__ == "__main__":
    main()
