"""Shift-consistency protocols over a batched classifier.

A protocol turns uint8 NHWC images into shifted views, runs them through `run` (float NCHW ->
logits) after `prepare` (uint8 NHWC -> float NCHW), and counts agreements:

- random-crop (Zhang 2019): two crops of size `crop` at random offsets per image; consistent when
  both get the same top-1. ImageNet style: the canvas is `crop + shift` (offsets in [0, shift]);
  CIFAR style (`pad`): the image padded by `shift` on each side, crops of the original size, so the
  two views are shifted within +-shift pixels.
- circular: the same with torch.roll-style shifts in [-shift, shift]^2 (nothing leaves the frame).
- diagonal: views shifted by (d, d) (canvas crops, pad-and-crop, or circular rolls); per shift the
  agreement with the unshifted view, accuracy, the mean probability of the class chosen there, and with
  labels each image's probability of its correct class (the plot of Zhang 2019).
- one-pixel: one-pixel diagonal steps at `shift` positions per image (views at (d, d), d = 0..shift; pairs
  d, d + 1): each image's agreement rate over its steps. Steps at every position cover every sampling
  phase of the network's strides, and more pairs per image tighten the interval over images.
- worst-case: every offset of the grid; consistent only if all views agree, correct only if all are.

What "agree" means depends on the output (`output_kind`): for (N, classes) outputs, the same top-1
class; for anything else (detection heads, dense maps, embeddings of another rank), random-crop and
circular report output stability: the cosine similarity of the two views' outputs (and their
relative change, in `settings`). A dense (N, C, h, w) map is compared after undoing the shift, which
needs circular shifts in whole output cells (multiples of its stride).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from aa_deploy.common.errors import InputError
from aa_deploy.common.input_format import Size, hw, size_text, square_or_pair
from aa_deploy.common.progress import Progress, counter
from aa_deploy.consistency.paired import bootstrap_ci

Forward = Callable[[np.ndarray], np.ndarray]  # a model as a function of its image input: a Runner called, a module
Prepare = Callable[[np.ndarray], np.ndarray]
PROTOCOLS = ("random-crop", "circular", "diagonal", "one-pixel", "worst-case")
PAD_MODES = {"reflect": "reflect", "zero": "constant", "replicate": "edge"}


@dataclass
class ConsistencyResult:
    """One model under one protocol."""

    protocol: str
    consistency: float  # share of images (or pairs) that agree, 0..1
    ci95: tuple[float, float]  # 95 % interval of `consistency` over images (see `paired`)
    accuracy: float | None  # top-1 on the unshifted (or first) views, with labels
    images: int
    views: int  # views run through the model
    per_pass: list[float] = field(default_factory=list)
    per_image: list[float] = field(default_factory=list)  # each image's agreement rate; mean = consistency
    per_image_correct: list[float] = field(default_factory=list)  # with labels: each image's top-1 rate over its views
    curve: dict | None = None  # diagonal: offsets, agreement, accuracy, probability
    settings: dict = field(default_factory=dict)
    metric: str = "top-1 agreement"  # or "output cosine" (non-classifier outputs)

    def as_dict(self) -> dict:
        return asdict(self)


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval for a proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class Harness:
    """Runs views through the model in fixed-size batches."""

    def __init__(
        self, run: Forward, prepare: Prepare, batch: int = 64, advance: Callable[[int], None] | None = None
    ) -> None:
        self.run, self.prepare, self.batch, self.advance = run, prepare, batch, advance
        self.views = 0

    def logits(self, views: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(views), self.batch):
            out.append(self.run(self.prepare(views[i : i + self.batch])))
            if self.advance is not None:
                self.advance(len(out[-1]))
        self.views += len(views)
        return np.concatenate(out)


def output_kind(out: np.ndarray, view: Size) -> tuple[str, int | None]:
    """("classifier", None) for (N, classes) scores, or for integer class labels (N,) / (N, 1) (an
    exported argmax); ("dense", stride) for an (N, C, h, w) map whose cells are `stride` px of the
    view (`view`: its side, or (height, width)) both ways; ("other", None) for anything else."""
    if is_labels(out) or out.ndim == 2:
        return "classifier", None
    (vh, vw), (oh, ow) = hw(view), out.shape[2:] if out.ndim == 4 else (0, 0)
    if min(oh, ow) > 1 and vh % oh == 0 and vw % ow == 0 and vh // oh == vw // ow:
        return "dense", vh // oh
    return "other", None


def is_labels(out: np.ndarray) -> bool:
    """An integer output of one value per sample: class labels (an argmax inside the graph)."""
    return np.issubdtype(out.dtype, np.integer) and out.ndim in (1, 2) and out.size == len(out)


def classes(out: np.ndarray) -> np.ndarray:
    """Each sample's class: the label itself, or the top-1 of its scores."""
    return out.reshape(len(out)).astype(np.int64) if is_labels(out) else out.argmax(1)


def cosine_and_change(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample cosine similarity and relative change |a - b| / |a| of two batches of outputs."""
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    cos = (a * b).sum(1) / np.maximum(na * nb, 1e-12)
    return np.clip(cos, -1.0, 1.0), np.linalg.norm(a - b, axis=1) / np.maximum(na, 1e-12)


def _canvas(images: np.ndarray, shift: int, pad: str | None) -> np.ndarray:
    if pad is None:
        return images
    return np.pad(images, ((0, 0), (shift, shift), (shift, shift), (0, 0)), mode=PAD_MODES[pad])


def _crop(canvas: np.ndarray, offsets: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Per-image crops: canvas[i, y:y+height, x:x+width] for offsets[i] = (y, x)."""
    h, w = size
    return np.stack([canvas[i, y : y + h, x : x + w] for i, (y, x) in enumerate(offsets)])


def _window(canvas: np.ndarray, y: int, x: int, size: tuple[int, int]) -> np.ndarray:
    """Every image's crop at (y, x) of `size` (height, width)."""
    return canvas[:, y : y + size[0], x : x + size[1]]


def _view(images: np.ndarray, crop: Size, whole: bool) -> tuple[int, int]:
    """(height, width) of the views: the images' own (pad-and-crop, circular: `whole`) or `crop`'s."""
    return (images.shape[1], images.shape[2]) if whole else hw(crop)


def _span(canvas: np.ndarray, size: tuple[int, int]) -> int:
    """The offsets a view of `size` has in `canvas` both ways: 0..span."""
    return min(canvas.shape[1] - size[0], canvas.shape[2] - size[1])


def roll_each(images: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Each NHWC image rolled circularly by its own (dy, dx) of `shifts`."""
    return np.stack([np.roll(img, tuple(s), axis=(0, 1)) for img, s in zip(images, shifts)])


def _dense_step(stride: int, shift: int, circular: bool) -> int:
    """The shift step for a dense output map of `stride`: whole cells, which only circular shifts can undo."""
    if not circular:
        raise InputError(
            f"a dense output map (stride {stride}) is compared after undoing the shift: use --protocol circular"
        )
    if shift < stride:
        raise InputError(
            f"circular shifts of up to {shift} px are finer than the output's stride {stride}: "
            f"give --shift {stride} or a multiple"
        )
    return stride


def _random_view(rng, images, canvas, size, span: int, shift: int, step: int, circular: bool):
    """One random view of every image and its offsets: a circular roll by a multiple of `step` within
    ±`shift`, or a crop of `size` from the canvas at 0..`span`."""
    if circular:
        offsets = step * rng.integers(-(shift // step), shift // step + 1, size=(len(images), 2))
        return offsets, roll_each(images, offsets)
    offsets = rng.integers(0, span + 1, size=(len(images), 2))
    return offsets, _crop(canvas, offsets, size)


def random_pairs(
    harness: Harness,
    images: np.ndarray,
    *,
    crop: Size,
    shift: int,
    passes: int = 5,
    seed: int = 0,
    pad: str | None = None,
    circular: bool = False,
    labels: np.ndarray | None = None,
) -> ConsistencyResult:
    """random-crop (or circular with `circular`): pairs of random views per image, over `passes` passes."""
    rng = np.random.default_rng(seed)
    canvas = _canvas(images, shift, pad)
    size = _view(images, crop, pad is not None or circular)
    span = _span(canvas, size)  # offsets 0..span
    kind, stride = output_kind(harness.run(harness.prepare(_window(canvas[:1], 0, 0, size))), size)
    step = _dense_step(stride, shift, circular) if kind == "dense" else 1
    agree, per_pass, correct, seen, change = 0.0, [], 0, 0, 0.0
    per_image = np.zeros(len(images))
    per_image_correct = np.zeros(len(images))
    for _ in range(passes):
        (a, va), (b, vb) = (_random_view(rng, images, canvas, size, span, shift, step, circular) for _ in range(2))
        oa, ob = harness.logits(va), harness.logits(vb)
        if kind == "classifier":
            la, lb = classes(oa), classes(ob)
            same = (la == lb).astype(float)
            if labels is not None:
                correct += int((la == labels).sum()) + int((lb == labels).sum())
                seen += 2 * len(images)
                per_image_correct += (la == labels).astype(float) + (lb == labels)
        else:
            if kind == "dense":  # back to the unshifted frame: whole cells
                oa = np.stack([np.roll(o, tuple(-s // step), axis=(1, 2)) for o, s in zip(oa, a)])
                ob = np.stack([np.roll(o, tuple(-s // step), axis=(1, 2)) for o, s in zip(ob, b)])
            same, rel = cosine_and_change(oa, ob)
            change += float(rel.sum())
        per_image += same
        agree += float(same.sum())
        per_pass.append(float(same.mean()))
    n = passes * len(images)
    settings = {"crop": square_or_pair(*size), "shift": shift, "passes": passes, "seed": seed, "pad": pad}
    if kind != "classifier":
        settings |= {"output": kind, "relative_change": change / n} | ({"stride": stride} if stride else {})
    return ConsistencyResult(
        protocol="circular" if circular else "random-crop",
        metric="top-1 agreement" if kind == "classifier" else "output cosine",
        consistency=agree / n,
        ci95=bootstrap_ci(per_image / passes),
        accuracy=correct / seen if seen else None,
        images=len(images),
        views=harness.views,
        per_pass=per_pass,
        per_image=(per_image / passes).tolist(),
        per_image_correct=(per_image_correct / (2 * passes)).tolist() if seen else [],
        settings=settings,
    )


def diagonal(
    harness: Harness,
    images: np.ndarray,
    *,
    crop: Size,
    shift: int,
    pad: str | None = None,
    labels: np.ndarray | None = None,
    circular: bool = False,
) -> ConsistencyResult:
    """Views shifted by (d, d): agreement with the unshifted view, accuracy, p(class of the unshifted view),
    and with labels each image's probability of its correct class at every shift (the paper's plot).

    Canvas crops: d = 0..shift from the top-left crop. Pad-and-crop: d = -shift..shift around the image.
    `circular`: the image rolled by d = 0..shift (nothing leaves the frame, no border is made up).
    """
    canvas = images if circular else _canvas(images, shift, pad)
    size = _view(images, crop, pad is not None or circular)
    base = shift if pad is not None and not circular else 0
    if circular:
        positions = list(range(shift + 1))
        logits = {p: harness.logits(np.roll(images, (p, p), axis=(1, 2))) for p in positions}
    else:
        positions = list(range(min(base + shift, _span(canvas, size)) + 1))
        logits = {p: harness.logits(_window(canvas, p, p, size)) for p in positions}
    base_class = logits[base].argmax(1)
    agreement, accuracy, probability, correct = [], [], [], []
    per_image = np.zeros(len(images))
    for p in positions:
        cls = logits[p].argmax(1)
        per_image += (cls == base_class) if p != base else 0
        agreement.append(float((cls == base_class).mean()))
        probs = softmax(logits[p])
        probability.append(float(probs[np.arange(len(cls)), base_class].mean()))
        accuracy.append(float((cls == labels).mean()) if labels is not None else None)
        if labels is not None:
            correct.append(probs[np.arange(len(cls)), labels])
    per_image = per_image / (len(positions) - 1) if len(positions) > 1 else np.ones(len(images))
    curve = {
        "offset": [p - base for p in positions],
        "agreement": agreement,
        "accuracy": accuracy,
        "probability": probability,
    }
    if labels is not None:  # images x offsets
        curve["correct_probability"] = np.stack(correct, axis=1).tolist()
    return ConsistencyResult(
        protocol="diagonal",
        consistency=float(per_image.mean()),
        ci95=bootstrap_ci(per_image),
        accuracy=accuracy[base],
        images=len(images),
        views=harness.views,
        per_image=per_image.tolist(),
        per_image_correct=(logits[base].argmax(1) == labels).astype(float).tolist() if labels is not None else [],
        curve=curve,
        settings={"crop": square_or_pair(*size), "shift": shift, "pad": pad, "circular": circular},
    )


def one_pixel(
    harness: Harness,
    images: np.ndarray,
    *,
    crop: Size,
    shift: int,
    pad: str | None = None,
    labels: np.ndarray | None = None,
) -> ConsistencyResult:
    """Agreement between views one pixel apart diagonally, at `shift` positions per image (canvas crops
    at (d, d) and (d + 1, d + 1), or pad-and-crop offsets -shift/2.. around the image)."""
    canvas = _canvas(images, shift, pad)
    size = _view(images, crop, pad is not None)
    if shift < 1 or _span(canvas, size) < shift:
        raise InputError(
            f"one-pixel needs room for {shift} steps: the canvas is {size_text(canvas.shape[1:3])} for "
            f"{size_text(size)} views"
        )
    start = (shift - shift // 2) if pad is not None else 0  # pad-and-crop: steps centred on the unshifted view
    previous = classes(harness.logits(_window(canvas, start, start, size)))
    first = previous
    per_image = np.zeros(len(images))
    for d in range(start + 1, start + shift + 1):
        cls = classes(harness.logits(_window(canvas, d, d, size)))
        per_image += cls == previous
        previous = cls
    per_image /= shift
    return ConsistencyResult(
        protocol="one-pixel",
        consistency=float(per_image.mean()),
        ci95=bootstrap_ci(per_image),
        accuracy=float((first == labels).mean()) if labels is not None else None,
        images=len(images),
        views=harness.views,
        per_image=per_image.tolist(),
        per_image_correct=(first == labels).astype(float).tolist() if labels is not None else [],
        settings={"crop": square_or_pair(*size), "shift": shift, "pad": pad, "steps": shift},
    )


def worst_case(
    harness: Harness,
    images: np.ndarray,
    *,
    crop: Size,
    shift: int,
    pad: str | None = None,
    labels: np.ndarray | None = None,
    circular: bool = False,
) -> ConsistencyResult:
    """Every shift of the grid: an image is consistent only if all its views agree (correct if all are)."""
    canvas = _canvas(images, shift, pad)
    size = _view(images, crop, pad is not None or circular)
    if circular:
        grid = [(dy, dx) for dy in range(-shift, shift + 1) for dx in range(-shift, shift + 1)]
    else:
        span = _span(canvas, size)
        grid = [(y, x) for y in range(span + 1) for x in range(span + 1)]
    first = None
    consistent = np.ones(len(images), bool)
    correct = np.ones(len(images), bool)
    for y, x in grid:
        views = np.roll(images, (y, x), axis=(1, 2)) if circular else _window(canvas, y, x, size)
        cls = classes(harness.logits(views))
        first = cls if first is None else first
        consistent &= cls == first
        if labels is not None:
            correct &= cls == labels
    k = int(consistent.sum())
    return ConsistencyResult(
        protocol="worst-case",
        consistency=k / len(images),
        ci95=wilson(k, len(images)),
        accuracy=float(correct.mean()) if labels is not None else None,
        images=len(images),
        views=harness.views,
        per_image=consistent.astype(float).tolist(),
        per_image_correct=correct.astype(float).tolist() if labels is not None else [],
        settings={"crop": square_or_pair(*size), "shift": shift, "pad": pad, "grid": len(grid), "circular": circular},
    )


def measure(
    protocol: str,
    run: Forward,
    prepare: Prepare,
    images: np.ndarray,
    *,
    crop: Size,
    shift: int,
    passes: int = 5,
    seed: int = 0,
    pad: str | None = None,
    labels: np.ndarray | None = None,
    batch: int = 64,
    progress: Progress | None = None,
    circular: bool = False,
) -> ConsistencyResult:
    """Run one protocol on one model; `progress` receives `Advance("views", ...)` after each batch. `circular`:
    the diagonal protocol rolls the image instead of cropping it."""
    total = view_count(protocol, len(images), shift=shift, passes=passes, pad=pad)
    harness = Harness(run, prepare, batch, counter(progress, "views", total))
    if protocol in ("diagonal", "one-pixel", "worst-case"):
        out = run(prepare(_window(images[:1], 0, 0, hw(crop))))
        if protocol == "diagonal" and is_labels(out):
            raise InputError(
                "diagonal reads class probabilities, and the output holds class labels: use random-crop, "
                "one-pixel or worst-case, or pick a score output with --output"
            )
        if output_kind(out, crop)[0] != "classifier":
            raise InputError(
                f"{protocol} compares top-1 classes, and the output has shape {tuple(out.shape)}, not (N, classes): "
                "use --protocol random-crop or circular (output stability), or pick a classifier output with --output"
            )
    if protocol == "random-crop":
        return random_pairs(harness, images, crop=crop, shift=shift, passes=passes, seed=seed, pad=pad, labels=labels)
    if protocol == "circular":
        return random_pairs(
            harness, images, crop=crop, shift=shift, passes=passes, seed=seed, circular=True, labels=labels
        )
    if protocol == "diagonal":
        return diagonal(harness, images, crop=crop, shift=shift, pad=pad, labels=labels, circular=circular)
    if protocol == "one-pixel":
        return one_pixel(harness, images, crop=crop, shift=shift, pad=pad, labels=labels)
    if protocol == "worst-case":
        return worst_case(harness, images, crop=crop, shift=shift, pad=pad, labels=labels)
    raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")


def view_count(protocol: str, images: int, *, shift: int, passes: int, pad: str | None) -> int:
    """How many views a protocol runs (for progress bars)."""
    if protocol in ("random-crop", "circular"):
        return 2 * passes * images
    if protocol == "diagonal":
        return (2 * shift + 1 if pad is not None else shift + 1) * images
    if protocol == "one-pixel":
        return (shift + 1) * images
    return (2 * shift + 1) ** 2 * images
