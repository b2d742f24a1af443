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
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from aa_deploy.consistency import measure
from aa_deploy.consistency.paired import bootstrap_ci
from aa_deploy.consistency.protocols import view_count
from aa_deploy.converters.bridge import OnnxModule
from aa_deploy.errors import InputError
from aa_deploy.input_format import Size, hw, square_or_pair

TEACHER_SHIFTS = 8  # shifted views (besides the image itself) the held-out teacher is averaged over
PASSES = 3
WORSE_LEVEL = 0.90  # `worse`: the two-sided 90 % interval of a paired difference below zero, one-sided 95 %


def pad_crop(images: np.ndarray, shift: int, rng: np.random.Generator) -> np.ndarray:
    """Random pad-and-crop shifts within +-shift pixels (zero padding); NHWC, any dtype."""
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (shift, shift), (shift, shift), (0, 0)))
    offsets = rng.integers(0, 2 * shift + 1, size=(n, 2))
    return np.stack([padded[i, y : y + h, x : x + w] for i, (y, x) in enumerate(offsets)])


def canvas_crops(canvases: np.ndarray, size: Size, rng: np.random.Generator, mirror: bool = True) -> np.ndarray:
    """A crop of `size` (one side, or (height, width)) of each NHWC canvas at a random offset, mirrored
    left-right with probability 1/2 when `mirror`."""
    n, h, w, _ = canvases.shape
    sh, sw = hw(size)
    ys, xs = rng.integers(0, h - sh + 1, n), rng.integers(0, w - sw + 1, n)
    crops = np.stack([c[y : y + sh, x : x + sw] for c, y, x in zip(canvases, ys, xs)])
    if mirror:
        flip = rng.random(n) < 0.5
        crops[flip] = crops[flip, :, ::-1]
    return crops


def centre(canvases: np.ndarray, span: int) -> np.ndarray:
    """The centre crop of each canvas, `span` px smaller: the view the model gets in use."""
    if span == 0:
        return canvases
    a = span // 2
    return canvases[:, a : a + canvases.shape[1] - span, a : a + canvases.shape[2] - span]


def autocast(device: torch.device):
    """bfloat16 mixed precision on a GPU, nothing on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


@torch.no_grad()
def logits(module: OnnxModule, prepare: Callable, images: np.ndarray, batch: int) -> torch.Tensor:
    """`module`'s first output for uint8/float NHWC `images`, in batches, as float32 on the CPU."""
    with autocast(module.device):
        outs = [
            module(torch.from_numpy(prepare(images[i : i + batch]))).float().cpu() for i in range(0, len(images), batch)
        ]
    return torch.cat(outs)


@torch.no_grad()
def soft_targets(teacher: OnnxModule, views: list[np.ndarray], prepare, temperature: float, batch: int) -> torch.Tensor:
    """The teacher's probabilities at `temperature`, averaged over `views` (the same images, shifted)."""
    return sum(F.softmax(logits(teacher, prepare, v, batch) / temperature, 1) for v in views) / len(views)


class HeldOut:
    """The held-out images and the teacher's answers on them. `span` > 0: the images are canvases
    `span` px larger than the model's input (the resize before the centre crop); the model's view is
    the centre crop, and consistency is measured as a user measures it for such a model
    (`aa-deploy consistency`: random-crop pairs of the canvas, and the diagonal shift)."""

    def __init__(
        self, teacher: OnnxModule, images: np.ndarray, prepare: Callable, *, seed: int = 0, batch: int = 250,
        shift: int = 4, span: int = 0,
    ):  # fmt: skip
        self.images, self.prepare, self.seed, self.batch, self.shift = images, prepare, seed, batch, shift
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

    def protocols(self, final: bool) -> dict:
        """figure name -> `consistency.measure` arguments; the diagonal only in `final` summaries."""
        if not self.span:
            return {
                "consistency_pad_crop": {"protocol": "random-crop", "shift": self.shift, "pad": "zero"},
                "consistency_circular": {"protocol": "circular", "shift": max(1, self.shift // 2), "pad": None},
            }
        found = {"consistency_random_crop": {"protocol": "random-crop", "shift": self.span, "pad": None}}
        if final:
            found["consistency_diagonal"] = {"protocol": "diagonal", "shift": max(1, self.span // 2), "pad": None}
        return found

    def views(self, final: bool = False) -> int:
        """Views one scoring (`figures`) runs through a model: what its seconds scale with."""
        counts = [
            view_count(
                settings["protocol"], len(self.images), shift=settings["shift"], passes=PASSES, pad=settings["pad"]
            )
            for settings in self.protocols(final).values()
        ]
        return sum(counts) + (len(self.images) if self.classifier else 0)

    def figures(self, module: OnnxModule, final: bool = False) -> tuple[dict, dict, dict]:
        """The figures above for `module`, the consistency results (for paired differences), and each
        image's fidelity hit and score ({"fidelity": ..., "score": ...}; empty for a model that is not
        a classifier). `final` adds the figures measured only before and after (the diagonal shift of
        canvas images); the score never counts them."""
        module.train(False)

        def run(x):
            with torch.no_grad(), autocast(module.device):
                return module(torch.from_numpy(x)).float().cpu().numpy()

        out: dict = {}
        if self.classifier:
            top1 = logits(module, self.prepare, self.view, self.batch).argmax(1).numpy()
            hits = top1 == self.averaged_top1
            out = {
                "fidelity": float(hits.mean()),
                "agreement": float((top1 == self.teacher_top1).mean()),
            }
        results = {}
        scored = self.protocols(final=False)
        for key, settings in self.protocols(final).items():
            try:
                results[key] = measure(
                    settings["protocol"], run, self.prepare, self.images, crop=self.size, shift=settings["shift"],
                    pad=settings["pad"], passes=PASSES, seed=self.seed, batch=min(self.batch, 64),
                )  # fmt: skip
            except InputError:  # a protocol that does not apply to this output (a dense map under pad-and-crop)
                pass
            out[key] = results[key].consistency if key in results else None
        per_image = {}
        if self.classifier:
            score = per_image_score(hits, {k: r for k, r in results.items() if k in scored})
            per_image = {"fidelity": hits.astype(np.float64), "score": score}
            out["score"] = float(per_image["score"].mean())
        return out, results, per_image


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


def worse(a: dict, b: dict) -> bool:
    """Whether per-image figures `a` (`figures`' third item) are worse than `b`'s: fidelity or score
    below them by more than the noise."""
    return any(below(a[key], b[key]) for key in ("fidelity", "score"))
