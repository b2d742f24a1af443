"""Consistency of several models on the same images and shifts (the first is the baseline): the images, the
measurement, and the comparison of runners that knows no backend (`sides` builds the runners)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aa_deploy.common import bundled
from aa_deploy.common.errors import InputError, SettingError
from aa_deploy.common.images import Preprocess, csv_labels, folder_labels, load_folder, normalize
from aa_deploy.common.input_format import InputFormat, Size, hw, size_text
from aa_deploy.common.progress import Progress, titled
from aa_deploy.consistency.protocols import ConsistencyResult, measure
from aa_deploy.converters.interface import Runner


@dataclass
class ImageSet:
    """uint8 NHWC canvases, optional labels, the model's preprocessing, and how shifts are made."""

    images: np.ndarray
    labels: np.ndarray | None
    prepare: object  # uint8 NHWC -> float32 NCHW
    crop: Size  # the view: one side, or (height, width)
    pad: str | None  # pad-and-crop padding mode, or None for crops of a larger canvas
    source: str

    def views(self, count: int | None = None) -> np.ndarray:
        """The first `count` images' top-left views (uint8 NHWC, the view's size)."""
        h, w = hw(self.crop)
        return self.images[:count, :h, :w]


def load_images(
    spec: str | None,
    *,
    crop: Size,
    shift: int,
    pad: str | None,
    preprocess=None,
    limit: int | None = None,
    labels: str | os.PathLike | None = None,
    circular: bool = False,
    fmt: InputFormat = InputFormat(),
) -> ImageSet:
    """`bundled:cifar10`, `bundled:photos`, or an image folder; labels from a `file,label` CSV or a
    folder-per-class layout. Images are loaded at the view size for pad-and-crop and `circular`
    shifts, and `shift` px larger for canvas crops; `prepare` feeds them as the model's input `fmt` takes them."""
    if spec == bundled.CIFAR10:
        prepare = bundled.cifar_feed(fmt)
        images, labels = bundled.cifar_test_images()
        return ImageSet(images[:limit], labels[:limit], prepare, 32, pad or "zero", "bundled CIFAR-10 test images")
    root = bundled.PHOTOS if spec in (None, bundled.PHOTO_SET) else Path(spec)
    base = preprocess or Preprocess(size=crop)
    # pad-and-crop and circular views keep the image size; canvas crops need room for the shift.
    grow = 0 if pad is not None or circular else shift
    canvas = tuple(d + grow for d in base.hw)
    pre = Preprocess(size=canvas, resize=max(*canvas, base.resize or 0), mean=base.mean, std=base.std)
    images, files = load_folder(root, pre, limit=limit)
    prep = Preprocess(size=base.size, mean=base.mean, std=base.std)
    found = csv_labels(labels, files, root) if labels else folder_labels(files, root)
    return ImageSet(images, found, lambda x: normalize(x, prep, fmt), base.size, pad, str(root))


def _selecting(runner, output: str | None, model: str):
    """`runner` as a function of one input returning the output named `output` (default: the first)."""

    def run(x: np.ndarray) -> np.ndarray:
        outs = runner.run({runner.input_names[0]: x})
        if output is None:
            return outs[0]
        names = runner.output_names  # a TensorRT runner learns them with its first result
        if output not in names:
            raise InputError(f"{model} has no output {output!r} (outputs: {', '.join(names)})")
        return outs[names.index(output)]

    return run


@dataclass(frozen=True)
class Measurement:
    """How the models are measured: the protocol, its shift (None: the protocol's default for these images),
    the view's size (None: the model's, else 224), passes of random pairs, the seed, the padding of
    pad-and-crop shifts (None: crops of a larger canvas), the batch, and the output read (None: the first)."""

    protocol: str = "random-crop"
    shift: int | None = None
    crop: Size | None = None
    passes: int = 5
    seed: int = 0
    pad: str | None = None
    batch: int = 64
    output: str | None = None

    def __post_init__(self) -> None:
        for name in ("passes", "batch"):
            if getattr(self, name) < 1:
                raise SettingError(name, "must be at least 1", getattr(self, name))


@dataclass(frozen=True)
class Images:
    """What the models are measured on: `bundled:cifar10`, `bundled:photos` or an image folder (None: the
    bundled set that fits the model's size), its preprocessing, at most `limit` images, and labels (a
    `file,label` CSV; else a folder per class, where the folder has them)."""

    source: str | os.PathLike | None = None
    preprocess: Preprocess | None = None
    limit: int | None = None
    labels: str | os.PathLike | None = None

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise SettingError("limit", "must be at least 1", self.limit)


def compare(
    runners: dict[str, Runner],
    fmt: InputFormat,
    measurement: Measurement = Measurement(),
    images: Images = Images(),
    progress: Progress | None = None,
) -> tuple[dict[str, ConsistencyResult], ImageSet]:
    """Each runner (by name, the first the baseline) under one protocol on the same images and the same random
    shifts, the images fed as `fmt` (the first model's input) takes them. Knows no backend: the runners come
    built (`sides.Models.runners`). `progress` receives each model's `Advance` through its views."""
    m = measurement
    side = fmt.size()  # the model's own size; None where dynamic
    size = m.crop or side or 224
    source = images.source if images.source is not None else bundled.default_images(size)
    small = source == bundled.CIFAR10 or m.pad is not None
    shift = m.shift
    if shift is None:
        shift = 2 if m.protocol == "circular" else 8 if m.protocol == "one-pixel" else (4 if small else 32)
    data = load_images(
        source, crop=size, shift=shift, pad=m.pad, preprocess=images.preprocess, limit=images.limit,
        labels=images.labels, circular=m.protocol == "circular", fmt=fmt,
    )  # fmt: skip
    if side is not None and hw(side) != hw(data.crop):
        raise InputError(f"views are {size_text(data.crop)}, the model takes {size_text(side)}: check --crop/--size")
    results = {}
    for name, runner in runners.items():
        results[name] = measure(
            m.protocol, _selecting(runner, m.output, name), data.prepare, data.images, crop=data.crop, shift=shift,
            passes=m.passes, seed=m.seed, pad=data.pad, labels=data.labels, batch=m.batch,
            progress=titled(progress, f"views of {Path(name).name}"),
        )  # fmt: skip
    return results, data
