"""Conversion wall time and peak RSS per model: python benchmarks/convert.py [MODEL ...] [--json FILE].

MODEL is an ONNX file or a model name (torchvision:resnet50, timm:convnext_tiny, ...), exported
first at 224x224. Each conversion runs in a fresh process so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

# Peak RSS from VmHWM: ru_maxrss is carried over from the (torch-laden) parent across fork/exec.
CHILD = """
import sys, time
t0 = time.perf_counter()
import aa_deploy
t1 = time.perf_counter()
result = aa_deploy.convert(sys.argv[1], sys.argv[2])
t2 = time.perf_counter()
hwm = next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(t1 - t0, t2 - t1, len(result.actions), result.blurs, hwm)
"""


def measure(onnx_path: Path, out: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(onnx_path), str(out)], capture_output=True, text=True, check=True
    )
    import_s, convert_s, sites, blurs, rss_kb = proc.stdout.split()
    return {
        "model_mb": round(onnx_path.stat().st_size / 2**20, 1),
        "import_s": round(float(import_s), 2),
        "convert_s": round(float(convert_s), 2),
        "sites": int(sites),
        "blurs": int(blurs),
        "peak_rss_mb": round(int(rss_kb) / 1024, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("models", nargs="*", default=["torchvision:resnet50", "timm:convnext_tiny", "torchvision:swin_t"])
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.models:
            path = Path(spec)
            if not path.exists():
                from aa_deploy.converters.export import export, load_model

                path = Path(tmp) / (spec.replace(":", "_") + ".onnx")
                export(load_model(spec)[0], path, (1, 3, 224, 224))
            rows[spec] = measure(path, Path(tmp) / "out.onnx")
            print(f"{spec:32s} " + "  ".join(f"{k}={v}" for k, v in rows[spec].items()), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
