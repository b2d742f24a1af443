"""The held-out slice every calibration decision is made on, and the figures read from it.

fidelity     top-1 agreement with the teacher averaged over shifts of each image (the original's
             test-time-augmented answer: an accuracy proxy that does not reward copying its aliasing)
agreement    top-1 agreement with the teacher's answer on the unshifted image
consistency  the protocols `calibrate` reports: pad-and-crop +-shift px and circular +-shift/2 px
             (4 and 2 by default); for canvas images (a resize before the centre crop) random-crop
             pairs of the canvas, and the diagonal shift in before/after summaries. On fixed shifts
             (the same views for every model and every epoch, so figures are paired)
score        fidelity + the mean of the consistencies, per image and averaged.

`worse` decides whether a distillation run failed against its start: when its fidelity, or its
score, is lower by more than the slice's noise. Consistency is never judged alone (a constant model
is perfectly consistent), and fidelity alone would reward the aliasing the blurs removed; but the
score alone lets a gain in consistency pay for a real loss of accuracy, so fidelity is guarded on its
own as well.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from aa_deploy.calibration.teacher_targets import autocast, logits, soft_targets
from aa_deploy.calibration.views import canvas_crops, centre, pad_crop
from aa_deploy.common.errors import InputError
from aa_deploy.common.input_format import square_or_pair
from aa_deploy.consistency import measure
from aa_deploy.consistency.paired import bootstrap_ci
from aa_deploy.consistency.protocols import ConsistencyResult, view_count
from aa_deploy.converters.bridge import OnnxModule

TEACHER_SHIFTS = 8  # shifted views (besides the image itself) the held-out teacher is averaged over
PASSES = 3
WORSE_LEVEL = 0.90  # `worse`: the two-sided 90 % interval of a paired difference below zero, one-sided 95 %


@dataclass(frozen=True)
class Protocol:
    """One consistency figure of the held-out slice: its name (as printed and recorded) and the
    `consistency.measure` settings it runs with."""

    name: Literal["pad-and-crop", "circular", "random-crop", "diagonal"]
    protocol: str
    shift: int
    pad: str | None

    @property
    def key(self) -> str:
        return figure_key(self.name)


# A consistency figure's key in a calibrated model's metadata, by protocol name.
FIGURE_KEYS = {
    "pad-and-crop": "consistency_pad_crop",
    "circular": "consistency_circular",
    "random-crop": "consistency_random_crop",
    "diagonal": "consistency_diagonal",
}


def figure_key(name: str) -> str:
    return FIGURE_KEYS[name]


@dataclass(frozen=True)
class Figures:
    """One model's figures on the held-out slice (shares, 0..1; None: not measured, or not a classifier):
    `consistency` by protocol name, in the order measured."""

    fidelity: float | None = None
    agreement: float | None = None
    consistency: dict[str, float | None] = field(default_factory=dict)
    score: float | None = None

    def as_dict(self) -> dict:
        """The record a calibrated model's metadata keeps (consistencies under `Protocol.key`)."""
        out = {"fidelity": self.fidelity, "agreement": self.agreement} if self.fidelity is not None else {}
        out |= {figure_key(name): value for name, value in self.consistency.items()}
        return out | ({"score": self.score} if self.score is not None else {})


@dataclass(frozen=True)
class PerImage:
    """Each held-out image's fidelity hit (0 or 1) and score: what `worse` pairs."""

    fidelity: np.ndarray
    score: np.ndarray


@dataclass(frozen=True)
class Scored:
    """A scoring's figures, the consistency results behind them (by protocol name: paired differences are
    taken from these), and the per-image values (None for a model that is not a classifier)."""

    figures: Figures
    runs: dict[str, ConsistencyResult]
    per_image: PerImage | None


class HeldOut:
    """The held-out images and the teacher's answers on them. `span` > 0: the images are canvases
    `span` px larger than the model's input (the resize before the centre crop); the model's view is
    the centre crop, and consistency is measured as a user measures it for such a model
    (`aa-deploy consistency`: random-crop pairs of the canvas, and the diagonal shift)."""

    def __init__(
        self, teacher: OnnxModule, images: np.ndarray, prepare: Callable, *, seed: int = 0, batch: int = 250,
        shift: int = 4, span: int = 0, passes: int = PASSES,
    ):  # fmt: skip
        self.images, self.prepare, self.seed, self.batch, self.shift = images, prepare, seed, batch, shift
        self.passes = passes  # random pairs per image of the random-crop and circular figures
        self.span = span
        self.size = square_or_pair(images.shape[1] - span, images.shape[2] - span)  # the model's view
        self.view = centre(images, span)
        rng = np.random.default_rng(seed + 1)
        others = (
            [canvas_crops(images, self.size, rng, mirror=False) for _ in range(TEACHER_SHIFTS)]
            if span
            else [pad_crop(images, shift, rng) for _ in range(TEACHER_SHIFTS)]
        )
        plain = logits(teacher, prepare, self.view, batch)
        self.classifier = plain.dim() == 2
        self.teacher_top1 = plain.argmax(1).numpy() if self.classifier else None
        self.averaged_top1 = (
            soft_targets(teacher, [self.view, *others], prepare, 1.0, batch).argmax(1).numpy()
            if self.classifier
            else None
        )

    def protocols(self, final: bool) -> tuple[Protocol, ...]:
        """The consistency figures this slice reports; the diagonal only in `final` summaries."""
        return protocols_for(self.span, self.shift, final)

    def views(self, final: bool = False) -> int:
        """Views one scoring (`score`) runs through a model: what its seconds scale with."""
        return scoring_views(len(self.images), self.span, self.shift, self.passes, final, self.classifier)

    def score(self, module: OnnxModule, final: bool = False, first: bool = False) -> Scored:
        """The figures above for `module`, its consistency results (for paired differences), and each image's
        fidelity hit and score (None for a model that is not a classifier). `final` adds the figures measured
        only before and after (the diagonal shift of canvas images); the score never counts them. `first`:
        the first protocol alone (pad-and-crop, or random-crop for canvas images)."""
        module.train(False)

        def run(x):
            with torch.no_grad(), autocast(module.device):
                return module(torch.from_numpy(x)).float().cpu().numpy()

        fidelity = agreement = None
        if self.classifier:
            top1 = logits(module, self.prepare, self.view, self.batch).argmax(1).numpy()
            hits = top1 == self.averaged_top1
            fidelity, agreement = float(hits.mean()), float((top1 == self.teacher_top1).mean())
        protocols = self.protocols(final)[:1] if first else self.protocols(final)
        runs = {}
        for p in protocols:
            try:
                runs[p.name] = measure(
                    p.protocol, run, self.prepare, self.images, crop=self.size, shift=p.shift, pad=p.pad,
                    passes=self.passes, seed=self.seed, batch=min(self.batch, 64),
                )  # fmt: skip
            except InputError:  # a protocol that does not apply to this output (a dense map under pad-and-crop)
                pass
        consistency = {p.name: runs[p.name].consistency if p.name in runs else None for p in protocols}
        per_image = None
        if self.classifier:
            scored = {p.name: runs[p.name] for p in protocols if p.name in runs and p.name != "diagonal"}
            per_image = PerImage(hits.astype(np.float64), per_image_score(hits, scored))
        figures = Figures(
            fidelity, agreement, consistency, None if per_image is None else float(per_image.score.mean())
        )
        return Scored(figures, runs, per_image)


def protocols_for(span: int, shift: int, final: bool) -> tuple[Protocol, ...]:
    """The consistency figures a held-out slice reports (`HeldOut.protocols`): pad-and-crop and circular for
    images the size of the model's view; random-crop (and in `final` summaries the diagonal) for canvases."""
    if not span:
        return (
            Protocol("pad-and-crop", "random-crop", shift, "zero"),
            Protocol("circular", "circular", max(1, shift // 2), None),
        )
    found = (Protocol("random-crop", "random-crop", span, None),)
    return found + ((Protocol("diagonal", "diagonal", max(1, span // 2), None),) if final else ())


def scoring_views(count: int, span: int, shift: int, passes: int, final: bool, classifier: bool = True) -> int:
    """Views one scoring of `count` held-out images runs through a model (`HeldOut.views`), known before the
    slice is made: what a time plan sizes the slice by."""
    views = sum(
        view_count(p.protocol, count, shift=p.shift, passes=passes, pad=p.pad)
        for p in protocols_for(span, shift, final)
    )
    return views + (count if classifier else 0)


# The teacher's answers a slice is made with (`HeldOut`): on each image, and averaged over it and its shifts.
TEACHER_VIEWS = 2 + TEACHER_SHIFTS


def per_image_score(hits: np.ndarray, results: dict) -> np.ndarray:
    """Each image's fidelity hit (0 or 1) + the mean of its consistencies (its share of agreeing
    pairs) over the protocols measured; their mean is fidelity + the mean of the consistencies."""
    cons = [np.asarray(r.per_image, np.float64) for r in results.values()]
    return hits.astype(np.float64) + (sum(cons) / len(cons) if cons else 0.0)


def below(a: np.ndarray, b: np.ndarray, level: float = WORSE_LEVEL) -> bool:
    """Whether per-image values `a` are below `b` (the same images) by more than the slice's noise:
    the whole interval of the mean paired difference below zero, by the same bootstrap over images
    as every interval `consistency` reports. On 100 images one image is 0.01 of a mean, and two runs
    of distillation differ by that much."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    return bootstrap_ci(d, level=level)[1] < 0


def worse(a: PerImage, b: PerImage) -> bool:
    """Whether per-image figures `a` are worse than `b`'s (the same images): fidelity or score below them by more
    than the noise."""
    return below(a.fidelity, b.fidelity) or below(a.score, b.score)
