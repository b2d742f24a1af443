"""How far conversion moved a model's outputs, read on bundled images right after `convert`.

Blurs change what every later layer sees, so a trained network converted without recalibration
usually answers differently (figures in docs/results.md).
`convert` runs the original and the converted graph on a few bundled images at the model's input
size (the 100 CIFAR-10 test images for 32-px models, else the six public-domain photos and their
mirror images) and says so in one line when they disagree: top-1 agreement for an (N, classes)
output, mean cosine similarity otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from aa_deploy.common import bundled
from aa_deploy.common.errors import InputError
from aa_deploy.common.input_format import read as read_input_format
from aa_deploy.consistency.compare import load_images
from aa_deploy.consistency.protocols import cosine_and_change
from aa_deploy.converters.onnxruntime import OnnxRuntimeRunner

LIMITS = {"top-1 agreement": 0.9, "cosine similarity": 0.99}  # below these, the model needs calibrating


@dataclass(frozen=True)
class Drift:
    metric: str
    value: float
    images: str
    count: int

    @property
    def needs_calibration(self) -> bool:
        return self.value < LIMITS[self.metric]

    def describe(self) -> str:
        return f"{self.metric} with the original {100 * self.value:.1f}% on {self.count} {self.images}"


def output_drift(original: str | os.PathLike, converted: str | os.PathLike, preprocess=None) -> Drift | None:
    """Original vs converted on bundled images; None for a model that does not take RGB images."""
    try:
        fmt = read_input_format(original)
        size = fmt.size() or 224
    except InputError:
        return None
    if fmt.channels != 3:
        return None
    spec = bundled.default_images(size, preprocessed=preprocess is not None)
    data = load_images(spec, crop=size, shift=0, pad="zero", preprocess=preprocess, fmt=fmt)
    images = data.images if spec == bundled.CIFAR10 else np.concatenate([data.images, data.images[:, :, ::-1]])
    x = data.prepare(images)
    with OnnxRuntimeRunner(original) as before, OnnxRuntimeRunner(converted) as after:
        a, b = before(x), after(x)
    for name, out in (("the original's", a), ("the converted model's", b)):
        if not np.isfinite(out).all():
            raise InputError(f"{name} outputs are not finite (NaN or inf) on bundled images")
    label = "bundled CIFAR-10 test images" if spec == bundled.CIFAR10 else "bundled photos and their mirror images"
    if a.ndim == 2:
        return Drift("top-1 agreement", float((a.argmax(1) == b.argmax(1)).mean()), label, len(x))
    return Drift("cosine similarity", float(cosine_and_change(a, b)[0].mean()), label, len(x))
