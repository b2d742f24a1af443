"""`aa-deploy calibrate`: converted ONNX + original ONNX + unlabeled images -> calibrated ONNX.

load both graphs -> split the images (a held-out slice for early stopping and the summary) ->
a closed-form start (`pointwise`, `reconstruct` or `stats`) -> `distill` (default) -> write the weights back by
initializer name -> check -> save.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch
from onnx_ir.passes.common import LiftConstantsToInitializersPass

from aa_deploy.calibration.budget import (
    Rates,
    Sizes,
    TimePlan,
    Work,
    forward,
    held_out_size,
    measure_rates,
    plan_time,
    replan_after_start,
)
from aa_deploy.calibration.distill import (
    RANGE_PROBE,
    DistillReport,
    Epoch,
    Recipe,
    Schedule,
    default_range_steps,
    distill,
)
from aa_deploy.calibration.held_out import PASSES, TEACHER_VIEWS, Figures, HeldOut, Scored, figure_key, scoring_views
from aa_deploy.calibration.matching import Counterparts, counterparts
from aa_deploy.calibration.reconstruct import calibrate_reconstruct
from aa_deploy.calibration.stats import calibrate_stats
from aa_deploy.calibration.views import centre
from aa_deploy.common import graph, model_io
from aa_deploy.common.atomic import refuse_overwrite
from aa_deploy.common.devices import DEVICES
from aa_deploy.common.errors import InputError, SettingError
from aa_deploy.common.images import ImageFiles, Preprocess, list_images, load_rgb, normalize, preprocess_for, spread
from aa_deploy.common.input_format import LAYOUTS, InputFormat, from_dims, size_text
from aa_deploy.common.progress import Progress, counter, silent
from aa_deploy.common.threads import ThreadFit, fit_threads, restores_threads
from aa_deploy.consistency.paired import PairedDelta, paired_difference
from aa_deploy.converters import precision
from aa_deploy.converters.bridge import OnnxModule, write_back
from aa_deploy.converters.bridge_check import check_against_onnxruntime

METHODS = ("stats", "reconstruct", "distill")
# Where distill starts from: `pointwise` refits the 1x1 convs and the classifier by least squares and
# rescales the spatial convs (`reconstruct.calibrate_reconstruct(spatial=False)`); `reconstruct` refits
# every conv; `stats` rescales every conv.
STARTS = ("pointwise", "reconstruct", "stats")
# What the training views and held-out figures shift: crops of the image resized before its centre crop
# (`canvas`), or the centre crop itself by pad-and-crop and circular rolls (`shift`).
VIEWS = ("auto", "canvas", "shift")


@dataclass(frozen=True)
class StartFit:
    """The closed-form start: its name, how the teacher's tensors were matched (names or structure), the
    student's trainable convs, and how many layers it refit by least squares and rescaled."""

    name: str
    matched_by: str
    convs: int
    refit: int
    rescaled: int


@dataclass(frozen=True)
class Planned:
    """A progress event: how a time limit will be spent (`after_start`: replanned once the start ran;
    `remeasured`: replanned after the opening figures, which ran that many times their estimate)."""

    plan: TimePlan
    after_start: bool = False
    remeasured: float | None = None


@dataclass(frozen=True)
class ThreadsFitted:
    """A progress event: the CPU threads changed to the cores other processes leave free (`aa_deploy.common.threads`),
    the student timed on a few held-out images at the count before and after."""

    fit: ThreadFit


@dataclass
class CalibrationResult:
    method: str
    images: int
    held_out: int
    before: Figures  # the converted model's held-out figures, before calibration
    after: Figures
    teacher: Figures
    seconds: float
    start: StartFit
    lr: float | None = None
    epochs: int | None = None
    kept_epoch: int | None = None  # the schedule's last epoch, or 0: the start was kept
    history: list[Epoch] = field(default_factory=list)
    # calibrated minus original consistency on the held-out images (same shifts: paired), by protocol name
    versus_teacher: dict[str, PairedDelta] = field(default_factory=dict)
    device: str = "cpu"
    batch: tuple[int, int] = (0, 0)  # evaluation, training
    activation_mb: float = 0.0  # activations one sample produces in a forward pass
    plan: TimePlan | None = None  # how a time limit was spent: the steps' sizes and expected seconds
    trained_on: int = 0  # training images distillation used (fewer than the folder's when a time limit cut them)
    dense: bool = False  # the calibrated model is a dense conversion (then dense sampling is no suggestion)
    teacher_dense: bool = False  # so is the teacher: the report names it "the dense teacher"


EVAL_BUDGET = 1 << 30  # bytes of activations one evaluation batch may produce
TRAIN_BUDGET = 3 << 29  # bytes of activations one training batch keeps for the backward pass
CACHE_BUDGET = 256 << 20  # training images held decoded in memory; beyond it they stream from disk
# The closed-form start reads enough images for about START_POSITIONS positions per channel at the
# input, and at least START_MIN: the deepest layers (7x7 maps with over a thousand input channels at
# ImageNet size) need a few hundred images for their least-squares refit, affordable since each node
# runs once per image (calibration/frontier.py). Decoded at once, within START_BUDGET bytes of float32.
START_POSITIONS = 1 << 20
START_MIN = 256
START_BUDGET = 256 << 20


def batch_sizes(module: OnnxModule, sample: torch.Tensor, train: int | None, views: int) -> tuple[int, int, int]:
    """(evaluation batch, training batch, bytes per sample): sized so that one batch's activations
    stay within EVAL_BUDGET / TRAIN_BUDGET (a training batch keeps them all, for each view)."""
    per_sample = max(1, module.activation_bytes(sample))
    evaluation = int(np.clip(EVAL_BUDGET // per_sample, 1, 250))
    if train is None:
        train = int(np.clip(TRAIN_BUDGET // (per_sample * views), 4, 64))
    return evaluation, train, per_sample


def _split(files: list[Path], held_out: float, seed: int) -> tuple[list[Path], list[Path]]:
    order = np.random.default_rng(seed).permutation(len(files))
    n_held = int(np.clip(round(held_out * len(files)), 10, 500))
    return [files[i] for i in order[:n_held]], [files[i] for i in order[n_held:]]


def _training_images(
    files: list[Path], decode: Preprocess, image_bytes: int, progress: Progress
) -> ImageFiles | np.ndarray:
    """The training images: decoded once when they fit CACHE_BUDGET, else decoded batch by batch from disk."""
    train = ImageFiles(files, decode)
    if len(train) * image_bytes > CACHE_BUDGET:
        return train
    advance = counter(progress, "decoding images", len(train))
    decoded = []
    for i in range(0, len(train), 250):
        decoded.append(train[np.arange(i, min(i + 250, len(train)))])
        advance(len(decoded[-1]))
    return np.concatenate(decoded)


def _start_count(view: np.ndarray, available: int) -> int:
    """Images the closed-form start reads: about START_POSITIONS input positions per channel, at least
    START_MIN, within START_BUDGET bytes of float32 and the images there are."""
    n = int(np.clip(START_POSITIONS // (view.shape[0] * view.shape[1]), START_MIN, 1000))
    return min(n, available, max(16, START_BUDGET // (4 * view.nbytes)))


def weights_as_initializers(model: ir.Model) -> ir.Model:
    """`model` with its large Constant nodes (weights some exporters, paddle2onnx and old zoo graphs among
    them, write as nodes) made initializers, which calibration trains and writes back."""
    LiftConstantsToInitializersPass(lift_all_constants=False)(model)
    return model


@contextmanager
def _for_onnxruntime(source: Path | None, model: ir.Model, widened: bool):
    """The file ONNX Runtime checks calibration's execution of `model` against: `source`, the file it was
    loaded from, unless it was widened from float16 or made in memory (no `source`): then `model` itself,
    written to a temporary folder."""
    if source is not None and not widened:
        yield source
        return
    with tempfile.TemporaryDirectory(prefix="aa-deploy-") as folder:
        path = Path(folder) / "model.onnx"
        ir.save(model, path)
        yield path


def image_input(model: ir.Model, layout: str | None, source: str) -> InputFormat:
    """The student's image input (float32: a float16 model is widened before it gets here)."""
    inputs = graph.data_inputs(model.graph)
    if len(inputs) != 1:
        raise InputError(f"{source}: calibrate feeds single-input models; this one has {len(inputs)} inputs")
    value = inputs[0]
    dims = [d if isinstance(d, int) else None for d in (value.shape or [])]
    fmt = from_dims(dims, value.dtype.numpy().name if value.dtype is not None else "float32", layout, source)
    return fmt


def _closed_form(training: Training) -> Callable:
    """The closed-form step that runs first (`Training.first_step`)."""
    return {
        "stats": calibrate_stats,
        "reconstruct": partial(calibrate_reconstruct, after_blur=not training.rescale_after_blur),
        "pointwise": partial(calibrate_reconstruct, spatial=False),
    }[training.first_step]


@dataclass(frozen=True)
class Data:
    """What to calibrate on: an image folder (no labels), its preprocessing (default: read from the
    model's input size), the held-out fraction, at most `limit` images (spread over the folder), and
    what the training views shift (`VIEWS`: `canvas` trains on, and measures with, crops of the image
    resized before its centre crop; `shift` on pad-and-crop shifts and circular rolls of the centre
    crop; `auto` is `canvas` wherever the preprocessing has such a resize)."""

    images: str | os.PathLike
    preprocess: Preprocess | None = None
    held_out: float = 0.1
    limit: int | None = None
    views: str = "auto"
    layout: str | None = None  # the image input's layout where the graph cannot say (input_format.LAYOUTS)

    def __post_init__(self) -> None:
        if self.views not in VIEWS:
            raise SettingError("views", f"must be one of {', '.join(VIEWS)}", self.views)
        if self.layout is not None and self.layout not in LAYOUTS:
            raise SettingError("layout", f"must be one of {', '.join(LAYOUTS)}", self.layout)
        if not 0 < self.held_out < 1:
            raise SettingError("held_out", "must be a fraction between 0 and 1", self.held_out)
        if self.limit is not None and self.limit < 1:
            raise SettingError("limit", "must be at least 1", self.limit)


@dataclass(frozen=True)
class Training:
    """How to calibrate: the method (`METHODS`), distillation's closed-form start (`STARTS`), the
    schedule (`max_epochs`, shortened to end `time_limit` seconds after the call when given; `lr`
    from a range test unless given), the distillation recipe, and `rescale_after_blur`: `reconstruct`
    (as the method or the start) rescales the spatial convs that read a blur's output instead of
    refitting them."""

    method: str = "distill"
    start: str = "pointwise"
    max_epochs: int = 45
    lr: float | None = None
    time_limit: float | None = None
    rescale_after_blur: bool = False
    recipe: Recipe = field(default_factory=Recipe)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SettingError("method", f"must be one of {', '.join(METHODS)}", self.method)
        if self.start not in STARTS:
            raise SettingError("start", f"must be one of {', '.join(STARTS)}", self.start)
        if self.time_limit is not None and self.time_limit <= 0:
            raise SettingError("time_limit", "must be positive", self.time_limit)
        if self.max_epochs < 1:
            raise SettingError("max_epochs", "must be 1 or more", self.max_epochs)

    @property
    def first_step(self) -> str:
        """The closed-form step that runs first: the method itself, or distillation's start."""
        return self.method if self.method != "distill" else self.start


@dataclass(frozen=True)
class Compute:
    """Where and in what pieces: `device` (auto, cpu, cuda), the training batch (default: sized to
    the activation budget) and the image-decoding workers."""

    device: str = "auto"
    batch_size: int | None = None
    workers: int | None = None

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise SettingError("device", "must be auto, cpu or cuda", self.device)
        if self.batch_size is not None and self.batch_size < 1:
            raise SettingError("batch_size", "must be 1 or more", self.batch_size)

    def torch_device(self) -> torch.device:
        """auto: the GPU when torch sees one, else the CPU; cuda without one is a clear error."""
        cuda = torch.cuda.is_available()
        if self.device == "cuda" and not cuda:
            raise InputError(
                "--device cuda: torch sees no CUDA GPU here (use --device cpu, or install a CUDA build of torch)"
            )
        return torch.device("cuda" if self.device == "cuda" or (self.device == "auto" and cuda) else "cpu")


@dataclass
class Pair:
    """The converted model and its original as calibration runs them: the modules (float32: a float16 graph
    is widened, exactly), the graphs they run, the graph the calibrated weights go back into (the student as
    given), which teacher tensor each student conv is fitted against, and the image input both take."""

    student: OnnxModule
    teacher: OnnxModule
    student_ir: ir.Model
    teacher_ir: ir.Model
    written: ir.Model
    widened: tuple[bool, bool]
    match: Counterparts
    fmt: InputFormat


def pair_models(student_ir: ir.Model, teacher_ir: ir.Model, names: tuple[str, str], layout, device) -> Pair:
    """Both graphs checked as a pair (finite weights, every trainable conv matched, same output and input)
    and made modules on `device`; `names`: how errors call the student and the teacher."""
    model, teacher = names
    for name, m in ((model, student_ir), (teacher, teacher_ir)):
        if (bad := model_io.non_finite(m)) is not None:
            raise InputError(f"{name}: initializer {bad!r} holds non-finite values (NaN or inf)")
    written = student_ir
    widened = (precision.is_float16(student_ir), precision.is_float16(teacher_ir))
    if widened[0]:  # the widening runs on a copy: the float16 graph as given gets the weights back
        student_ir = precision.widen_float16(ir.serde.deserialize_model(ir.serde.serialize_model(student_ir)))
    teacher_ir = precision.widen_float16(teacher_ir) if widened[1] else teacher_ir
    student, teacher_m = OnnxModule(student_ir).eval().to(device), OnnxModule(teacher_ir).eval().to(device)
    match = counterparts(student, teacher_m)
    if match.matched < match.convs:
        raise InputError(
            f"{teacher}: {match.matched} of the {match.convs} trainable convs of {model} have a counterpart in "
            f"it (by name, or by graph structure): the teacher must be the model that was converted"
        )
    ours, theirs = (tuple(graph.dims(m.graph.outputs[0]) or ())[1:] for m in (student_ir, teacher_ir))
    if ours and theirs and None not in ours + theirs and ours != theirs:
        raise InputError(
            f"{teacher}: its output is {list(theirs)} per sample and {model}'s {list(ours)}: the teacher must "
            "be the model that was converted"
        )
    fmt, teacher_fmt = image_input(student_ir, layout, model), image_input(teacher_ir, layout, teacher)
    if teacher_fmt != fmt:
        raise InputError(
            f"{teacher} takes {teacher_fmt}, and {model} takes {fmt}: the teacher must be the model that was converted"
        )
    return Pair(student, teacher_m, student_ir, teacher_ir, written, widened, match, fmt)


@dataclass(frozen=True)
class Views:
    """What the images become: the model's preprocessing, the canvas the training views are cropped from
    (`span` px larger both ways, 0: shifts of the centre crop itself), how they are decoded, and the recipe
    with its span and student views settled."""

    preprocess: Preprocess
    fmt: InputFormat
    span: int
    decode: Preprocess
    recipe: Recipe

    def prepare(self, x: np.ndarray) -> np.ndarray:
        return normalize(x, self.preprocess, self.fmt)

    def centre(self, images: np.ndarray) -> np.ndarray:
        """The model's view of decoded images (their centre crop), prepared as its input."""
        return self.prepare(centre(images, self.span))


def plan_views(fmt: InputFormat, data: Data, recipe: Recipe, source: str) -> Views:
    preprocess = preprocess_for(fmt, data.preprocess, source)
    height, width = preprocess.hw
    span = max(0, (preprocess.resize or 0) - max(height, width))
    if data.views == "canvas" and not span:
        raise InputError(
            f"--views canvas crops the image resized before its centre crop, and this preprocessing resizes to "
            f"the model's {size_text(preprocess.size)} (give --preprocess with a larger resize, or --views shift)"
        )
    span = span if data.views != "shift" else 0
    recipe = replace(recipe, span=span, student_views=recipe.student_views or (1 if span else 2))
    # Canvas views: every image decoded at the resize (its short side), `span` px larger than the model's view
    # both ways; their centre crop is what the model sees in use.
    return Views(preprocess, fmt, span, replace(preprocess, size=(height + span, width + span)), recipe)


def check_pair(pair: Pair, sources: tuple[Path | None, Path | None], batch: np.ndarray) -> None:
    """Both graphs as calibration runs them, against ONNX Runtime on one real batch, before anything trains;
    `sources`: the files they were loaded from (None: made in memory)."""
    graphs = (pair.student_ir, pair.teacher_ir)
    for source, m, widened, module in zip(sources, graphs, pair.widened, (pair.student, pair.teacher)):
        with _for_onnxruntime(source, m, widened) as path:
            check_against_onnxruntime(path, module, batch)


def step_sizes(views: Views, training: Training, checker: HeldOut, train: int, batch: int) -> tuple[Work, Sizes]:
    """What the steps do per image, and the sizes they run at without a time limit."""
    recipe = views.recipe
    work = Work(
        target_passes=2 * max(1, recipe.teacher_views) if views.span else 0,
        step_teacher_passes=0 if views.span else recipe.teacher_views,
        batch=batch,
        max_epochs=training.max_epochs,
        distill=training.method == "distill",
    )
    defaults = Sizes(
        start_images=_start_count(checker.view[0], train),
        train_images=train,
        probe_images=min(RANGE_PROBE, len(checker.images)),
        range_steps=default_range_steps(train, batch),
    )
    return work, defaults


@dataclass
class Sample:
    """The images of one calibration: all of them, the held-out files and those of them decoded (a few, until
    the slice is sized: then all, with the teacher's answers on them: `checker`), the training files, the
    seconds one image took to decode, and the batch sizes."""

    files: list[Path]
    held_files: list[Path]
    held_images: np.ndarray
    train_files: list[Path]
    decode_seconds: float
    eval_batch: int
    train_batch: int
    per_sample: int  # bytes of activations one sample produces
    checker: HeldOut | None = None


RATE_IMAGES = 8  # held-out images decoded before the plan: the rates are measured on them
SLOWER = 1.25  # opening figures this many times their estimate: the plan made again is printed, sizes changed or not


def take_sample(pair: Pair, views: Views, data: Data, training: Training, compute: Compute) -> Sample:
    """At most `data.limit` images spread over the folder, split into a held-out slice (its first few decoded)
    and training images."""
    files = spread(list_images(data.images), data.limit, data.images)
    if len(files) < 20:
        raise InputError(f"{data.images}: {len(files)} images is too few to calibrate (need 20 or more)")
    held_files, train_files = _split(files, data.held_out, training.seed)
    decoding = time.perf_counter()
    held_images = np.stack([load_rgb(p, views.decode) for p in held_files[:RATE_IMAGES]])
    decode_seconds = (time.perf_counter() - decoding) / len(held_images)
    first = torch.from_numpy(views.centre(held_images[:1]))
    eval_batch, train_batch, per_sample = batch_sizes(
        pair.student, first, compute.batch_size, views.recipe.student_views
    )
    return Sample(files, held_files, held_images, train_files, decode_seconds, eval_batch, train_batch, per_sample)


def hold_out(pair: Pair, views: Views, training: Training, sample: Sample, count: int) -> Sample:
    """`sample` with its held-out slice cut to `count` images, decoded, and the teacher's answers on them."""
    rest = [load_rgb(p, views.decode) for p in sample.held_files[len(sample.held_images) : count]]
    held = np.concatenate([sample.held_images[:count], np.stack(rest)]) if rest else sample.held_images[:count]
    checker = HeldOut(
        pair.teacher, held, views.prepare, seed=training.seed, batch=sample.eval_batch, shift=views.recipe.shift,
        span=views.span,
    )  # fmt: skip
    if training.method == "distill" and not checker.classifier:
        raise InputError(
            "distill matches the class probabilities of an (N, classes) output, and this model's output is not one "
            "(a dense map or a detection head): use --method reconstruct (or stats)"
        )
    return replace(sample, held_files=sample.held_files[:count], held_images=held, checker=checker)


def _distill(pair: Pair, views: Views, training: Training, compute: Compute, sample: Sample, plan: TimePlan,
             left: float | None, report: Progress) -> DistillReport:  # fmt: skip
    """Distillation on the planned training images (decoded once where they fit in memory), ending `left`
    seconds from now (None: no limit)."""
    sizes = plan.sizes
    train = _training_images(
        sample.train_files[: sizes.train_images], views.decode, sample.held_images[0].nbytes, report
    )
    schedule = Schedule(
        max_epochs=training.max_epochs, batch=sample.train_batch, eval_batch=sample.eval_batch, lr=training.lr,
        seed=training.seed, workers=compute.workers, time_limit=left, probe=sizes.probe_images,
        range_steps=sizes.range_steps,
    )  # fmt: skip
    return distill(pair.student, pair.teacher, train, sample.checker, views.prepare, views.recipe, schedule, report)


@dataclass
class Calibrated:
    """The calibrated graph (the student as given, its weights and metadata replaced) and what it took."""

    model: ir.Model
    result: CalibrationResult


@restores_threads
def calibrate_model(
    student_ir: ir.Model,
    teacher_ir: ir.Model,
    data: Data,
    training: Training = Training(),
    compute: Compute = Compute(),
    *,
    names: tuple[str, str] = ("the converted model", "the original"),
    sources: tuple[Path | None, Path | None] = (None, None),
    progress: Progress | None = None,
    started: float | None = None,
) -> Calibrated:
    """Calibrate `student_ir` against `teacher_ir` in memory (the file shell is `calibrate`): pair the graphs,
    settle the views, split the images, check both graphs against ONNX Runtime, score the pair, size the
    steps to the time limit, fit the closed-form start, distill, score again, write the weights back.
    `names`: what errors call the two graphs; `sources`: the files they were loaded from, unchanged (ONNX
    Runtime checks those; None: the graphs themselves, written to a temporary folder for the check).
    `progress` receives `Advance` (decoding, the start's layers, teacher targets), `Planned` (with a time
    limit), `ThreadsFitted` (under a time limit on the CPU), `EpochsPlanned` and each `Epoch`. `started`: the `time.perf_counter()` the time limit counts from
    (a command's start; None: now)."""
    report = progress or silent
    began = time.perf_counter() if started is None else started
    torch.manual_seed(training.seed)
    pair = pair_models(student_ir, teacher_ir, names, data.layout, compute.torch_device())
    views = plan_views(pair.fmt, data, training.recipe, names[0])
    sample = take_sample(pair, views, data, training, compute)
    batch = views.centre(sample.held_images)
    check_pair(pair, sources, batch)
    # The plan before anything long: the slice sized by the rates of a few images, then the opening figures.
    speed = _Speed(pair.student, torch.from_numpy(batch[:THREAD_IMAGES]), training, report)
    rates = _rates(pair, views, sample, training, torch.from_numpy(batch))
    sample = hold_out(pair, views, training, sample, _held_count(rates, views, sample, training, began))
    held = len(sample.held_images)
    rates = None if rates is None else _figures(rates, views, held)
    work, defaults = step_sizes(views, training, sample.checker, len(sample.train_files), sample.train_batch)
    planning = _Planning(training, began, defaults, work)
    plan = planning.plan(rates, held)
    report(Planned(plan))
    opening = _opening(pair, sample, speed, rates, plan, planning, report)
    rates, plan = opening.rates, opening.plan
    start = _start(pair, views, training, sample.train_files[: plan.sizes.start_images], sample.eval_batch, report)
    if rates is not None:  # the machine's speed again, the threads fitted again: a shared machine changes
        rates = rates.all_scaled(speed.slower())
    plan = replan_after_start(plan, time.perf_counter() - began, rates, defaults, work)
    distilled = None
    if training.method == "distill" and plan.sizes.distill:
        if plan.sizes != defaults:
            report(Planned(plan, after_start=True))
        left = None if rates is None else training.time_limit - rates.closing - (time.perf_counter() - began)
        distilled = _distill(pair, views, training, compute, sample, plan, left, report)
    speed.refit()
    after = sample.checker.score(pair.student, final=True)
    write_back(pair.written, {name: p.detach().cpu().numpy() for name, p in pair.student.trainable().items()})
    result = replace(
        _result(pair, sample, training, plan, _Scores(opening.teacher, opening.before, after), began, start, distilled),
        dense=bool(model_io.sites_where(student_ir, "dense")), teacher_dense=bool(model_io.sites_where(teacher_ir, "dense")),
    )  # fmt: skip
    model_io.write_metadata(pair.written, {"calibration": _record(result, data, training, views, sample.checker, pair)})
    return Calibrated(pair.written, result)


@dataclass(frozen=True)
class _Planning:
    """What a time plan is made from besides the rates: the run's settings, the `time.perf_counter()` the
    limit counts from, the steps' sizes without a limit, and what each step does per image."""

    training: Training
    began: float
    defaults: Sizes
    work: Work

    def plan(self, rates: Rates | None, held: int) -> TimePlan:
        plan = plan_time(self.training.time_limit, time.perf_counter() - self.began, rates, self.defaults, self.work)
        return replace(plan, held_out=held)


@dataclass(frozen=True)
class _Opening:
    """The opening figures (the teacher's scoring, the student's figures before calibration), and the rates
    and the plan as they stand after them."""

    teacher: Scored
    before: Figures
    rates: Rates | None
    plan: TimePlan


@dataclass(frozen=True)
class _Scores:
    """The held-out scores a result reports: the teacher's scoring, the student's figures before, its
    scoring after."""

    teacher: Scored
    before: Figures
    after: Scored


def _opening(pair: Pair, sample, speed, rates, plan: TimePlan, planning: _Planning, report: Progress) -> _Opening:
    """The opening figures (the teacher's and the student's before), then, under a time limit, the plan made
    again from how long they took against the estimate of `rates`."""
    opening = time.perf_counter()
    original = sample.checker.score(pair.teacher, final=True)
    scoring = time.perf_counter()
    before = sample.checker.score(pair.student, final=True).figures
    if rates is not None:  # the opening against its estimate: every rate scaled by how much slower it ran
        # at the threads fitted now (fewer are faster when another job took a core meanwhile)
        faster = speed.refit().speed_up
        measured = (time.perf_counter() - scoring) / faster
        # never faster: what a run saves, distillation's own clock gives back as epochs
        factor = max(1.0, (time.perf_counter() - opening) / max(rates.opening, 1e-9) / faster)
        rates = replace(
            rates.scaled(factor), opening=0.0, final=measured,
            figures=measured * sample.checker.views(final=False) / sample.checker.views(final=True),
        )  # fmt: skip
        remade = planning.plan(rates, len(sample.held_images))
        if remade.sizes != plan.sizes or factor >= SLOWER:
            report(Planned(remade, remeasured=factor))
        plan = remade
    return _Opening(original, before, rates, plan)


def _result(pair: Pair, sample, training: Training, plan, scores: _Scores, began: float, start, distilled):
    """The run's record from its held-out `scores`."""
    original, before, after = scores.teacher, scores.before, scores.after
    learned = {} if distilled is None else {
        "lr": distilled.lr, "epochs": distilled.epochs, "kept_epoch": distilled.kept_epoch,
        "history": distilled.history, "trained_on": plan.sizes.train_images,
    }  # fmt: skip
    return CalibrationResult(
        training.method, len(sample.files), len(sample.held_images), before, after.figures, original.figures,
        time.perf_counter() - began, start,
        versus_teacher={name: paired_difference(original.runs[name], run) for name, run in after.runs.items()},
        device=str(pair.student.device), batch=(sample.eval_batch, sample.train_batch),
        activation_mb=sample.per_sample / 2**20, plan=plan if training.time_limit is not None else None, **learned,
    )  # fmt: skip


THREAD_IMAGES = 4  # held-out images the student's forward is timed on to fit the threads


class _Speed:
    """The CPU threads fitted to the cores other processes leave free (`aa_deploy.common.threads`) under a time limit
    on the CPU, at the plan and at each step after, and the student's forward on a few images timed at
    each fit: the machine's speed; without a limit the threads stay as they are, so that the run is
    reproducible bit for bit."""

    def __init__(self, student: OnnxModule, x: torch.Tensor, training: Training, report: Progress):
        self.student, self.x, self.report = student, x, report
        self.on = training.time_limit is not None and student.device.type == "cpu"
        self.fits: list[ThreadFit] = []
        self.refit()

    def refit(self) -> ThreadFit:
        """The threads fitted now (reported when they change); a neutral fit when they are not fitted."""
        if not self.on:
            return ThreadFit(torch.get_num_threads(), torch.get_num_threads(), None, {})
        self.fits.append(fit_threads(lambda: forward(self.student, self.x)))
        if self.fits[-1].threads != self.fits[-1].previous:
            self.report(ThreadsFitted(self.fits[-1]))
        return self.fits[-1]

    def slower(self) -> float:
        """Refit, and how many times slower the forward now runs than at the fit before: never below 1 at the
        same threads (a faster moment is not promised to the plan), below 1 where other threads are faster."""
        if not self.on:
            return 1.0
        before, now = self.fits[-1], self.refit()
        ratio = now.seconds[now.threads] / before.seconds[before.threads]
        return ratio if now.threads != before.threads else max(1.0, ratio)


def _rates(pair: Pair, views: Views, sample: Sample, training: Training, batch: torch.Tensor) -> Rates | None:
    """This machine's rates for the time plan, measured on `batch` (None without a time limit)."""
    if training.time_limit is None:
        return None
    return measure_rates(pair.teacher, pair.student, batch, views.recipe.student_views, 0.0, sample.decode_seconds)


def _figures(rates: Rates, views: Views, held: int) -> Rates:
    """`rates` with the seconds of the held-out figures on `held` images estimated from them: decoding them, the
    teacher's answers and both models' opening figures, and the student's figures of each epoch and at the close."""
    final = scoring_views(held, views.span, views.recipe.shift, PASSES, final=True)
    epoch = scoring_views(held, views.span, views.recipe.shift, PASSES, final=False)
    opening = held * (rates.decode + TEACHER_VIEWS * rates.teacher) + final * (rates.teacher + rates.student)
    return replace(rates, figures=epoch * rates.student, final=final * rates.student, opening=opening)


def _held_count(rates: Rates | None, views: Views, sample: Sample, training: Training, began: float) -> int:
    """The held-out images whose figures, before and after, fit the limit's share for them (all without one)."""
    held = len(sample.held_files)
    if rates is None:
        return held
    estimated = _figures(rates, views, held)
    per_image = (estimated.opening + estimated.closing) / held
    return held_out_size(training.time_limit, time.perf_counter() - began, held, per_image)


def _start(pair: Pair, views: Views, training: Training, files: list[Path], batch: int, report) -> StartFit:
    """The closed-form start (distill's: `pointwise` unless told) on `files`, decoded at once (256..1,000
    images, START_BUDGET at most) and gone through layer by layer."""
    x = torch.from_numpy(views.centre(np.stack([load_rgb(p, views.decode) for p in files])))
    fitted = _closed_form(training)(pair.student, pair.teacher, x, batch, names=pair.match.names, progress=report)
    refit = sum(bool(r.get("refit")) for r in fitted)
    return StartFit(training.first_step, pair.match.by, pair.match.convs, refit, len(fitted) - refit)


def _record(
    result: CalibrationResult, data: Data, training: Training, views: Views, checker: HeldOut, pair: Pair
) -> dict:
    """The calibration's metadata record, written into the model."""
    scored = ", ".join(p.key for p in checker.protocols(final=False))
    record = {
        "method": result.method,
        "start": training.first_step,
        "rescale_after_blur": training.rescale_after_blur,
        "images": str(data.images),
        "count": result.images,
        "held_out": result.held_out,
        "seed": training.seed,
        "lr": result.lr,
        "epochs": result.epochs,
        "kept_epoch": result.kept_epoch,
        "start_fit": asdict(result.start),
        "recipe": asdict(views.recipe),
        "views": "canvas" if views.span else "shift",
        "score": f"fidelity + mean({scored}) on the held-out images",
        "original": result.teacher.as_dict(),
        "before": result.before.as_dict(),
        "after": result.after.as_dict(),
        "versus_teacher": {figure_key(name): d.as_dict() for name, d in result.versus_teacher.items()},
        "preprocess": views.preprocess.as_dict(),
        # what the images were fed as: the input's layout, channels, height x width and type, the views' size
        "input": pair.fmt.as_dict() | {"view": [int(d) for d in checker.view.shape[1:3]]},
    }
    if pair.widened[0]:
        record["precision"] = "float16, calibrated as its float32 widening and rounded back"
    return record


def calibrate(
    model: str | os.PathLike,
    teacher: str | os.PathLike,
    data: Data,
    output: str | os.PathLike,
    training: Training = Training(),
    compute: Compute = Compute(),
    *,
    progress: Progress | None = None,
    check: bool = True,
    started: float | None = None,
) -> CalibrationResult:
    """Calibrate the converted `model` against `teacher` on `data`'s unlabeled images; writes `output`.
    `progress`, `started`: as `calibrate_model` takes them. `check`: run onnx's checker on the result before
    saving."""
    compute.torch_device()  # a missing GPU is said before anything loads
    model_path, out_path = Path(model), Path(output)
    refuse_overwrite(out_path, model_path, teacher, data.images)
    student_ir = model_io.load(model_path)
    return calibrate_to_file(
        student_ir, teacher, data, out_path, training, compute, name=str(model_path), source=model_path,
        progress=progress, check=check, started=started,
    )  # fmt: skip


def calibrate_to_file(
    model: ir.Model,
    teacher: str | os.PathLike,
    data: Data,
    output: Path,
    training: Training = Training(),
    compute: Compute = Compute(),
    *,
    name: str,
    source: Path,
    progress: Progress | None = None,
    check: bool = True,
    started: float | None = None,
) -> CalibrationResult:
    """Calibrate `model`, a graph in memory, against the `teacher` file and write it to `output` (already
    checked by the caller not to overwrite an input); `name`: what errors call it; `source`: a file that holds
    the same graph, which ONNX Runtime checks calibration's execution against."""
    compute.torch_device()  # a missing GPU is said before the teacher loads
    student_ir, teacher_ir = weights_as_initializers(model), weights_as_initializers(model_io.load(teacher))
    calibrated = calibrate_model(
        student_ir, teacher_ir, data, training, compute, names=(name, str(teacher)), sources=(source, Path(teacher)),
        progress=progress, started=started,
    )  # fmt: skip
    written = calibrated.model
    model_io.save(written, output, external=model_io.uses_external_data(written), check=check)
    return calibrated.result
