"""`aa-deploy tune`: the remedy for this model, chosen on the user's images under the user's budget.

split the images (calibration part, selection part) -> the candidates and their multiply-adds -> the
original's figures on the selection part -> each candidate within the budget, cheapest first: convert,
time it where latency is bounded, calibrate on the calibration part (the candidates that calibrate share
what is left of the time limit), measure on the selection part (accuracy on the calibration part too where
it was not calibrated on it), paired against the original -> the rule (`rule.Rule`) -> the chosen model
with the whole frontier in its metadata.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from aa_deploy.calibration.calibrate import (
    Compute,
    Data,
    calibrate_model,
    image_input,
    plan_views,
    weights_as_initializers,
)
from aa_deploy.calibration.recipe import Recipe
from aa_deploy.common import model_io
from aa_deploy.common.errors import InputError, SettingError
from aa_deploy.common.images import load_rgb
from aa_deploy.common.progress import Progress, silent
from aa_deploy.conversion.graph_pass import convert_model, inspect
from aa_deploy.converters.onnxruntime import OnnxRuntimeRunner
from aa_deploy.converters.timing import latency_ratio
from aa_deploy.tune.candidates import Candidate, space
from aa_deploy.tune.rule import MEASURED, OUT_OF_TIME, OVER_BUDGET, REFUSED, Budget, Delta, Row, Rule
from aa_deploy.tune.selection import Measured, Selection, SessionModule, Split, linked, split

# Seconds a calibrating candidate needs at least from its share of the time limit: pairing the graphs,
# their check against ONNX Runtime and the opening figures come before anything is fitted.
MIN_CALIBRATION = 30.0
MEASURE_BATCH = 64  # views per ONNX Runtime call on the selection images


@dataclass(frozen=True)
class Images:
    """What tune decides on: an image folder (at most `limit` images, spread over it), the model's
    preprocessing (None: from its input size), labels (a `file,label` CSV; else a folder per class where the
    folder has them; else fidelity decides), the share kept for selection, and the image input's layout
    where the graph cannot say."""

    folder: str | os.PathLike
    preprocess: object = None
    labels: str | os.PathLike | None = None
    selection: float = 0.5
    limit: int | None = None
    layout: str | None = None

    def __post_init__(self) -> None:
        if not 0 < self.selection < 1:
            raise SettingError("selection", "must be a fraction between 0 and 1", self.selection)
        if self.limit is not None and self.limit < 1:
            raise SettingError("limit", "must be at least 1", self.limit)


@dataclass(frozen=True)
class Trying:
    """A progress event: a candidate is about to be built and measured (`detail`: its time share, if any)."""

    name: str
    detail: str = ""


@dataclass(frozen=True)
class Tried:
    """A progress event: a candidate's row, complete."""

    row: Row


@dataclass
class Tuned:
    """The frontier (the original first), the chosen row (None: no candidate qualifies), the rule, the budget,
    the split, the seconds the search took, and the models of all measured candidates (`model`: the chosen's)."""

    rows: list[Row]
    chosen: Row | None
    rule: Rule
    budget: Budget
    split: Split
    seconds: float
    measured: dict[str, ir.Model] = field(default_factory=dict)  # every measured candidate's model, by name

    @property
    def model(self) -> ir.Model | None:
        """The chosen candidate's model (None: no candidate qualifies)."""
        return self.measured[self.chosen.name] if self.chosen is not None else None

    def record(self) -> dict:
        """The search as the chosen model's metadata (`aa_deploy.tune`) and the JSON report keep it."""
        return {
            "chosen": self.chosen.name if self.chosen else None,
            "rule": self.rule.describe(),
            "tolerance": self.rule.tolerance,
            "accuracy": self.rule.accuracy,
            "protocol": self.rule.protocol,
            "pairs": self.rule.pairs,
            "budget": asdict(self.budget),
            "split": self.split.as_dict(),
            "seed": self.split.seed,
            "seconds": round(self.seconds, 1),
            "candidates": [r.as_dict() for r in self.rows],
        }


def _copy(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def _write(model: ir.Model, folder: Path, name: str) -> Path:
    """`model` written to `folder` as `name`.onnx, for ONNX Runtime to measure and time."""
    path = folder / f"{key(name).replace('+', '_').replace('/', '_')}.onnx"
    ir.save(model, path)
    return path


class _Clock:
    """The time limit of the whole search (None: no limit)."""

    def __init__(self, limit: float | None) -> None:
        self.limit, self.began = limit, time.perf_counter()

    @property
    def spent(self) -> float:
        return time.perf_counter() - self.began

    @property
    def left(self) -> float:
        return float("inf") if self.limit is None else self.limit - self.spent


def tune(
    model: ir.Model,
    images: Images,
    budget: Budget = Budget(),
    tolerance: float = 0.5,
    compute: Compute = Compute(),
    *,
    seed: int = 0,
    only: tuple[str, ...] | None = None,
    name: str = "the model",
    progress: Progress | None = None,
) -> Tuned:
    """Choose the remedy for `model` (the original, in memory: not changed) on `images` under `budget`: every
    candidate within it measured on the selection part, paired against the original, and chosen by the rule
    (`rule.Rule` with `tolerance` points). `only`: the candidates to try, by name (spaces left out: `dense-1`,
    `blur+refit`); None: the default ones (all but `blur+refit`). `progress` receives `Trying` and `Tried` per
    candidate, and the calibrations' own events. `name`: what errors call the model."""
    report = progress or silent
    rule = Rule(tolerance)  # checks the tolerance before anything runs
    clock = _Clock(budget.time_limit)
    compute.torch_device()  # a missing GPU is said before anything runs
    torch.manual_seed(seed)
    model = weights_as_initializers(_copy(model))
    if not inspect(_copy(model)):
        raise InputError(f"{name}: no downsampling sites found: no candidate applies")
    costed = _only(space(model, seed)[1:], only)
    parts = split(images.folder, images.selection, seed, images.limit)
    fmt = image_input(model, images.layout, name)
    views = plan_views(fmt, Data(images.folder, images.preprocess, layout=images.layout), Recipe(), name)
    first = views.centre(load_rgb(parts.selection[0], views.decode)[None])
    with tempfile.TemporaryDirectory(prefix="aa-deploy-tune-") as tmp, ExitStack() as sessions:
        folder = Path(tmp)
        original = _write(model, folder, "original")
        teacher = sessions.enter_context(OnnxRuntimeRunner(original))  # the original's sessions: until the end
        selection = Selection(
            SessionModule(teacher), parts.selection, parts.root, views, labels=images.labels,
            seed=seed, batch=compute.batch_size or MEASURE_BATCH, unseen=parts.calibration,
        )  # fmt: skip
        rule = replace(
            rule, accuracy=selection.accuracy_name, protocol=selection.protocol.name, pairs=selection.checker.passes
        )
        report(Trying("original"))
        scoring = time.perf_counter()
        base = selection.measure(selection.teacher)
        per_scoring = time.perf_counter() - scoring
        rows = [_row(Row("original", 1.0, 1.0 if budget.max_latency else None), base, base, per_scoring)]
        report(Tried(rows[0]))
        timing = None
        if budget.max_latency:
            timing = _Timing(sessions.enter_context(OnnxRuntimeRunner(original, budget.provider)), first)
        context = _Context(
            model, selection, base, parts, images, compute, clock, per_scoring, timing, budget, report, folder
        )
        built = _candidates(costed, rows, context)
    chosen = rule.choose(rows)
    tuned = Tuned(rows, chosen, rule, budget, parts, clock.spent, built)
    if tuned.model is not None:
        model_io.write_metadata(tuned.model, {"tune": tuned.record()})
    return tuned


def key(name: str) -> str:
    """A candidate's name as a command line writes it: `blur + refit` -> `blur+refit`."""
    return name.replace(" ", "")


def _only(costed: list, only: tuple[str, ...] | None) -> list:
    """The candidates named in `only` (None: the default ones), or a one-line error naming the ones there are."""
    if only is None:
        return [c for c in costed if c.candidate.default]
    known = [key(c.candidate.name) for c in costed]
    unknown = [n for n in only if key(n) not in known]
    if unknown:
        raise InputError(f"no candidate {', '.join(unknown)} for this model (candidates: {', '.join(known)})")
    return [c for c in costed if key(c.candidate.name) in {key(n) for n in only}]


def _row(row: Row, base: Measured, measured: Measured, seconds: float) -> Row:
    """`row` with `measured`'s figures and their paired differences from the original's (`base`); accuracy
    over the calibration part too where the candidate was measured there (it was not calibrated on it)."""
    ours, theirs = measured.accuracy, base.accuracy
    if measured.unseen_accuracy is not None:
        ours = np.concatenate([ours, measured.unseen_accuracy])
        theirs = np.concatenate([theirs, base.unseen_accuracy])
    row.accuracy, row.accuracy_images = float(ours.mean()), len(ours)
    row.accuracy_delta = Delta.of(theirs, ours)
    row.consistency = measured.consistency.consistency
    row.consistency_delta = Delta.of(base.consistency.per_image, measured.consistency.per_image)
    row.one_pixel = measured.one_pixel.consistency
    row.one_pixel_delta = Delta.of(base.one_pixel.per_image, measured.one_pixel.per_image)
    row.seconds = seconds
    return row


class _Timing:
    """Latency against the original's (its session on ONNX Runtime's `provider`), batch 1, of the files
    `_write` wrote; each candidate's session lives while it is timed."""

    def __init__(self, original: OnnxRuntimeRunner, x: np.ndarray) -> None:
        self.original, self.x = original, x

    def ratio(self, path: Path) -> float:
        with OnnxRuntimeRunner(path, self.original.provider) as candidate:
            return latency_ratio(self.original, candidate, self.x)["ratio"]


@dataclass
class _Context:
    """What every candidate is built, calibrated and measured with."""

    original: ir.Model
    selection: Selection
    base: Measured  # the original's figures
    parts: Split
    images: Images
    compute: Compute
    clock: _Clock
    per_scoring: float  # seconds one measurement of the original took
    timing: _Timing | None
    budget: Budget
    report: Progress
    folder: Path  # where the candidates are written for ONNX Runtime


def _candidates(costed: list, rows: list[Row], c: _Context) -> dict[str, ir.Model]:
    """Each candidate's row appended to `rows` (refused, over the budget, out of time, or measured); the
    measured candidates' models by name."""
    budget, built = c.budget, {}
    for i, costs in enumerate(costed):
        row = Row(costs.candidate.name, costs.macs_ratio)
        if costs.refused is not None:
            row.status, row.reason = REFUSED, costs.refused
        elif budget.max_macs is not None and costs.macs_ratio > budget.max_macs + 1e-9:
            row.status, row.reason = OVER_BUDGET, f"multiply-adds x{costs.macs_ratio:.2f} > x{budget.max_macs:g}"
        else:
            later = [d for d in costed[i:] if d.refused is None and d.macs_ratio <= (budget.max_macs or math.inf)]
            found = _attempt(costs.candidate, row, later, c)
            if found is not None:
                built[row.name] = found
        c.report(Tried(row))
        rows.append(row)
    return built


def _attempt(candidate: Candidate, row: Row, later: list, c: _Context) -> ir.Model | None:
    """Build, time, calibrate and measure one candidate within the budget, filling `row`; its model, or None
    where it was not measured (`row.status` says why). `later`: the candidates from this one on that will be
    tried, whose measuring the time limit keeps room for."""
    began = time.perf_counter()
    converted = _copy(c.original)
    convert_model(converted, candidate.options)
    converted.graph.name = c.original.graph.name
    path = _write(converted, c.folder, row.name)
    if c.timing is not None:
        row.latency_ratio = c.timing.ratio(path)
        if row.latency_ratio > c.budget.max_latency:
            row.status, row.reason = OVER_BUDGET, f"latency x{row.latency_ratio:.2f} > x{c.budget.max_latency:g}"
            return None
    scoring = c.per_scoring * (row.macs_ratio or 1.0)
    share = None
    if candidate.training is not None and c.clock.limit is not None:
        share = _share(later, c)
        if share < MIN_CALIBRATION:
            row.status, row.reason = OUT_OF_TIME, f"{max(share, 0):.0f} s left to calibrate it"
            return None
    elif c.clock.left < scoring:
        row.status, row.reason = OUT_OF_TIME, f"measuring it takes ~{scoring:.0f} s, {max(c.clock.left, 0):.0f} s left"
        return None
    c.report(Trying(row.name, f"{share / 60:.1f} min to calibrate" if share is not None else ""))
    model = converted if candidate.training is None else _calibrate(converted, candidate, share, row, c)
    if model is None:
        return None
    if candidate.training is not None:  # the calibrated weights (written into `converted` itself) are measured
        path = _write(model, c.folder, row.name)
    with OnnxRuntimeRunner(path) as session:
        measured = c.selection.measure(SessionModule(session), calibrated=candidate.training is not None)
    _row(row, c.base, measured, time.perf_counter() - began)
    row.status = MEASURED
    return model


def _share(later: list, c: _Context) -> float:
    """The seconds the first of `later` (a calibrating candidate) may calibrate for: what is left after
    measuring every candidate from it on, split evenly among the calibrating ones; where that is below
    MIN_CALIBRATION a share each, the last (the costliest) give up theirs first, so the cheap ones run."""
    fixed = [d for d in later if d.candidate.training is None]
    calibrating = [d for d in later if d.candidate.training is not None]
    while calibrating:
        reserve = sum(c.per_scoring * (d.macs_ratio or 1.0) for d in fixed + calibrating)
        share = (c.clock.left - reserve) / len(calibrating)
        if share >= MIN_CALIBRATION or len(calibrating) == 1:
            return share
        calibrating.pop()
    return 0.0


def _calibrate(converted: ir.Model, candidate: Candidate, share: float | None, row: Row, c: _Context):
    """`converted` calibrated against the original on the calibration part within `share` seconds (None: no
    limit), what it did recorded in `row`; None where calibrate refuses it (`row` says why)."""
    training = replace(candidate.training, time_limit=share)
    try:
        with linked(c.parts.root, c.parts.calibration) as folder:
            data = Data(folder, c.images.preprocess, layout=c.images.layout)
            calibrated = calibrate_model(converted, _copy(c.original), data, training, c.compute,
                                         names=(row.name, "the original"), progress=c.report)  # fmt: skip
    except InputError as e:
        row.status, row.reason = REFUSED, str(e)
        return None
    result = calibrated.result
    row.calibration = {
        "method": result.method, "share_s": round(share, 1) if share is not None else None,
        "seconds": round(result.seconds, 1), "epochs": result.epochs, "kept_epoch": result.kept_epoch, "lr": result.lr,
    }  # fmt: skip
    return calibrated.model
