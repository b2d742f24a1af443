"""Consistency of several models on the same images and shifts (the first is the baseline)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aa_deploy import bundled
from aa_deploy.consistency.protocols import ConsistencyResult, measure, view_count
from aa_deploy.converters.pytorch import TorchRunner
from aa_deploy.converters.runners import make_runner
from aa_deploy.converters.tensorrt import Sidecar
from aa_deploy.errors import InputError
from aa_deploy.images import Preprocess, csv_labels, folder_labels, load_folder, normalize
from aa_deploy.input_format import InputFormat, Size, from_dims, hw, size_text
from aa_deploy.input_format import read as read_input_format

BUNDLED_PHOTOS = Path(__file__).resolve().parents[1] / "assets" / "photos"


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
    if spec == "bundled:cifar10":
        prepare = bundled.cifar_feed(fmt)
        images, labels = bundled.cifar_test_images()
        return ImageSet(images[:limit], labels[:limit], prepare, 32, pad or "zero", "bundled CIFAR-10 test images")
    root = BUNDLED_PHOTOS if spec in (None, "bundled:photos") else Path(spec)
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


def _input_format(model: str | os.PathLike, backend: str, layout: str | None) -> InputFormat:
    """The first model's image input: from the ONNX file, or from an engine's sidecar (its opt shape)."""
    if backend == "tensorrt":
        return from_dims(list(next(iter(Sidecar.read(model).shapes.values()))[1]), "float32", layout, str(model))
    return read_input_format(model, layout)


def compare(
    models: list[str | os.PathLike],
    *,
    images: str | None = None,
    protocol: str = "random-crop",
    shift: int | None = None,
    crop: Size | None = None,
    passes: int = 5,
    seed: int = 0,
    pad: str | None = None,
    preprocess=None,
    batch: int = 64,
    provider: str = "cpu",
    backend: str = "onnxruntime",
    limit: int | None = None,
    labels: str | os.PathLike | None = None,
    progress=None,
    output: str | None = None,
    layout: str | None = None,
    reference: tuple | None = None,
    device: str = "cpu",
    runners: dict | None = None,
) -> tuple[dict[str, ConsistencyResult], ImageSet]:
    """Each model (ONNX file) under one protocol on the same images and the same random shifts.

    `progress`, if given, is a context manager factory `progress(total) -> advance(n)` (a progress bar).
    `output` names the output to measure (default: the first); `layout`: the image input's layout where
    the graph cannot say. `reference`: (label, nn.Module), the PyTorch original run first, as the
    baseline, on `device`, fed the views the first model is fed. `runners`: those `runners_of` made for
    the same arguments (to time them afterwards), else made here.
    """
    if not models:
        raise InputError("nothing to measure: give a model (and --compare models) besides --reference")
    fmt = _input_format(models[0], backend, layout)
    if runners is None:
        runners = runners_of(models, backend, provider, reference, device, fmt.layout)
    side = fmt.size()  # the model's own size; None where dynamic
    size = crop or side or 224
    if images is None:
        images = "bundled:cifar10" if size == 32 else "bundled:photos"
    small = images == "bundled:cifar10" or pad is not None
    if shift is None:
        shift = 2 if protocol == "circular" else 8 if protocol == "one-pixel" else (4 if small else 32)
    data = load_images(
        images,
        crop=size,
        shift=shift,
        pad=pad,
        preprocess=preprocess,
        limit=limit,
        labels=labels,
        circular=protocol == "circular",
        fmt=fmt,
    )
    if side is not None and hw(side) != hw(data.crop):
        raise InputError(f"views are {size_text(data.crop)}, the model takes {size_text(side)}: check --crop/--size")
    from contextlib import nullcontext

    total = len(runners) * view_count(protocol, len(data.images), shift=shift, passes=passes, pad=data.pad)
    results = {}
    with progress(total) if progress else nullcontext(None) as advance:
        for name, runner in runners.items():
            results[name] = measure(
                protocol,
                _selecting(runner, output, name),
                data.prepare,
                data.images,
                crop=data.crop,
                shift=shift,
                passes=passes,
                seed=seed,
                pad=data.pad,
                labels=data.labels,
                batch=batch,
                progress=advance,
            )
    return results, data


def runners_of(
    models, backend: str = "onnxruntime", provider: str = "cpu", reference=None, device: str = "cpu", layout=None
) -> dict:
    """The runners `compare` measures, by name, in order: the reference (a TorchRunner fed the first
    model's layout) first when there is one."""
    if reference is not None and layout is None:
        layout = _input_format(models[0], backend, None).layout
    runners = {}
    if reference is not None:
        runners[reference[0]] = TorchRunner(reference[1], device, layout or "NCHW")
    return runners | {str(m): make_runner(m, backend, provider) for m in models}
