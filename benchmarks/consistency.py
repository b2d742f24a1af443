"""Throughput of the consistency harness against raw batched inference on the same backend.

python benchmarks/consistency.py [MODEL.onnx] [--json FILE]: without a model, the bundled ResNet-20
is exported first. Both sides run the same number of 32x32 views in batches of 64 through one
ONNX Runtime session (2 threads), alternating A B A B; the ratio is harness / raw images per second.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("model", nargs="?")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json")
    args = p.parse_args()

    from aa_deploy.common import bundled
    from aa_deploy.consistency import measure
    from aa_deploy.converters.onnxruntime import OnnxRuntimeRunner

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            from aa_deploy.converters.export import export

            path = export(bundled.resnet20(), Path(tmp) / "r20.onnx", (2, 3, 32, 32))
        runner = OnnxRuntimeRunner(path, threads=2)
        images, _ = bundled.cifar_test_images()
        images = np.concatenate([images] * 5)  # 500 images
        passes = 2
        views = 2 * passes * len(images)
        ready = bundled.cifar_normalize(images[np.arange(views) % len(images)])

        def raw() -> float:
            start = time.perf_counter()
            for i in range(0, views, 64):
                runner(ready[i : i + 64])
            return views / (time.perf_counter() - start)

        def harness() -> float:
            start = time.perf_counter()
            measure("random-crop", runner, bundled.cifar_normalize, images, crop=32, shift=4, pad="zero", passes=passes)
            return views / (time.perf_counter() - start)

        raw(), harness()  # warm-up
        ratios, raws, harnesses = [], [], []
        for _ in range(args.rounds):
            r, h = raw(), harness()
            raws.append(r)
            harnesses.append(h)
            ratios.append(h / r)
    row = {
        "views": views,
        "raw_images_per_s": round(statistics.median(raws), 1),
        "harness_images_per_s": round(statistics.median(harnesses), 1),
        "ratio_median": round(statistics.median(ratios), 3),
        "ratio_min": round(min(ratios), 3),
        "ratio_max": round(max(ratios), 3),
    }
    print("  ".join(f"{k}={v}" for k, v in row.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
