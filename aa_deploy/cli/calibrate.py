"""`aa-deploy calibrate`: win back accuracy after conversion, label-free."""

from __future__ import annotations

import argparse
from functools import partial

from rich.console import Console

from aa_deploy.calibration.calibrate import (
    METHODS,
    STARTS,
    VIEWS,
    CalibrationResult,
    Compute,
    Data,
    Planned,
    ThreadsFitted,
    Training,
    calibrate,
)
from aa_deploy.calibration.distill import Epoch, EpochsPlanned
from aa_deploy.calibration.recipe import Recipe
from aa_deploy.cli import common
from aa_deploy.common import model_io
from aa_deploy.common.devices import DEVICES


def add(sub) -> None:
    k = sub.add_parser("calibrate", help="win back accuracy after conversion, label-free")
    k.add_argument("model", help="the converted ONNX model")
    k.add_argument(
        "--teacher",
        required=True,
        help="the original ONNX model (or its dense conversion, convert --dense-last N: layer targets averaged over its sampling phases)",
    )
    k.add_argument("--images", required=True, help="folder of unlabeled calibration images (recursive)")
    k.add_argument("-o", "--output", required=True)
    _add_method_flags(k)
    k.add_argument(
        "--views",
        default="auto",
        choices=VIEWS,
        help="what distillation shifts and the held-out figures measure: canvas, crops of the image resized "
        "before its centre crop (random-crop pairs, as `aa-deploy consistency` measures such a model), each "
        "image's target computed once and reused, no mixup; shift, pad-and-crop shifts and circular rolls of "
        "the centre crop itself; auto (default): canvas when the preprocessing resizes beyond the input size",
    )
    k.add_argument(
        "--epochs",
        type=int,
        default=45,
        help="epochs of distillation: the cosine schedule's length (default %(default)s)",
    )
    k.add_argument(
        "--time-limit",
        type=float,
        metavar="MINUTES",
        help="end the whole command within this many minutes: the speed of both models is measured first, and "
        "the closed-form start's images, the range test and the training images (with their teacher targets) "
        "are cut to fit, distillation keeping at least two epochs or, where even that does not fit, dropped; "
        "the plan is printed before it runs, and after each epoch the schedule is replanned to the epochs that "
        "the last one's duration says fit, so its rate still decays to zero",
    )
    k.add_argument("--lr", type=float, help="learning rate (default: chosen by a short range test)")
    k.add_argument("--limit", type=int, help="use at most this many images")
    k.add_argument("--seed", type=int, default=0)
    _add_recipe_flags(k)
    k.add_argument("--device", default="auto", choices=DEVICES, help="auto: the GPU when torch sees one")
    k.add_argument("--batch-size", type=int, help="training batch (default: 64, less where activations are large)")
    k.add_argument("--workers", type=int, help="image-decoding worker processes (default: up to 4)")
    common.add_preprocess(k)
    k.set_defaults(run=run)


def _add_method_flags(k: argparse.ArgumentParser) -> None:
    """The method, distillation's closed-form start, and how reconstruct treats the convs after a blur."""
    k.add_argument(
        "--method",
        default="distill",
        choices=METHODS,
        help="stats: rescale each conv's channels; reconstruct: refit each conv by least squares against the "
        "original's conv outputs (no training); distill (default): a closed-form start (--start), then train "
        "towards the shift-averaged original",
    )
    k.add_argument(
        "--start",
        default="pointwise",
        choices=STARTS,
        help="where distill starts (default %(default)s: the 1x1 convs and the classifier refit by least squares, "
        "the spatial convs rescaled, so that no spatial kernel can sharpen itself back against the blur; reconstruct "
        "refits every conv; stats rescales every conv)",
    )
    k.add_argument(
        "--rescale-after-blur",
        action="store_true",
        help="with --method reconstruct or --start reconstruct: rescale the spatial convs that read a blur's output "
        "instead of refitting them (a refit kernel can sharpen itself to undo the blur); the pointwise and stats "
        "starts rescale every spatial conv already",
    )


def _add_recipe_flags(k: argparse.ArgumentParser) -> None:
    """The distillation recipe's flags (`Recipe`)."""
    k.add_argument(
        "--no-mixup", action="store_true", help="train on shifted images only, without blending pairs of them"
    )
    k.add_argument(
        "--teacher-views",
        type=int,
        default=Recipe.teacher_views,
        help="the teacher's answer is averaged over this many shifts of each image (default %(default)s; "
        "0: the teacher sees the student's own view, and the student learns its aliasing)",
    )
    k.add_argument(
        "--student-views",
        type=int,
        default=None,
        help="shifted views of each image the student trains on, all towards the same averaged teacher "
        "(default: 2, or 1 with canvas views, whose targets are cached so that the student is the whole cost of a step)",
    )
    k.add_argument(
        "--shift",
        type=int,
        default=Recipe.shift,
        help="training views are shifted by up to this many pixels each way, and the held-out consistency "
        "measured at this shift (pad-and-crop) and half of it (circular) (default %(default)s)",
    )
    k.add_argument(
        "--invariance",
        type=float,
        default=Recipe.invariance,
        help="weight of a term pulling the student's shifted views of an image towards their mean answer "
        "(default %(default)s; needs --student-views 2 or more)",
    )
    k.add_argument(
        "--no-circular-views",
        action="store_true",
        help="every student view a pad-and-crop shift (default: every second one a circular roll of the image)",
    )
    k.add_argument(
        "--average-epochs",
        type=float,
        default=Recipe.average_epochs,
        help="score and keep an exponential average of the weights over about this many epochs "
        "(default %(default)s: the weights themselves)",
    )


# The records' fields set by a flag of another name (the rest: the flag is the field's name).
FLAGS = {"max_epochs": "epochs"}


def configuration(args: argparse.Namespace) -> tuple[Data, Training, Compute]:
    """The library's configuration from the flags. The records check every setting; a setting out of range is
    reported under the flag that gave it, with the value as given."""
    with common.setting_errors(args, FLAGS):
        recipe = Recipe(
            shift=args.shift,
            mix=not args.no_mixup,
            teacher_views=args.teacher_views,
            student_views=args.student_views,
            invariance=args.invariance,
            circular=not args.no_circular_views,
            average_epochs=args.average_epochs,
        )
        data = Data(
            args.images,
            preprocess=common.preprocess(args, model=args.model),
            limit=args.limit,
            views=args.views,
            layout=args.layout,
        )
        training = Training(
            method=args.method,
            start=args.start,
            max_epochs=args.epochs,
            lr=args.lr,
            time_limit=None if args.time_limit is None else 60 * args.time_limit,
            rescale_after_blur=args.rescale_after_blur,
            recipe=recipe,
            seed=args.seed,
        )
        return data, training, Compute(device=args.device, batch_size=args.batch_size, workers=args.workers)


def run(args: argparse.Namespace, console: Console) -> int:
    data, training, compute = configuration(args)
    return calibrate_and_report(args.model, args.teacher, args.output, data, training, compute, console)


def calibrate_and_report(
    model, teacher, output, data: Data, training: Training, compute: Compute, console: Console
) -> int:
    """Calibrate (the library's `calibrate`) with its progress shown, then its figures, verdict and advice
    (`calibrate` itself, and `convert --calibrate` with the defaults)."""
    with common.progress_bars(console, partial(_event, console)) as progress:
        result = calibrate(
            model, teacher, data, output, training, compute, progress=progress, started=common.command_started()
        )
    who = _teacher_word(teacher)
    console.print(_figures(result, who))
    console.print(
        f"fidelity: top-1 agreement with {who} averaged over shifts of each image; agreement: with its answer on "
        "the image itself"
    )
    if result.versus_teacher:
        console.print(f"verdict on {result.held_out} held-out images, calibrated against {who}: {verdict(result, who)}")
    if any(d.ci95[0] <= 0 for d in result.versus_teacher.values()):
        dense = bool(model_io.sites_where(model_io.load_proto(model), "dense"))
        console.print(
            f"[yellow]not more consistent than {who} here. Measure on other images (aa-deploy consistency); "
            "more calibration images usually help"
            + (
                "[/yellow]"
                if dense
                else "; dense sampling needs no training: aa-deploy convert ORIGINAL --dense-last 2 --filter none "
                "(exact, at the compute aa-deploy inspect states)[/yellow]"
            )
        )
    s = result.start
    console.print(
        f"start ({s.name}): the teacher's layers matched by {s.matched_by} for all {s.convs} trainable convs; "
        f"{s.refit} layers refit by least squares, {s.rescaled} rescaled"
    )
    console.print(
        f"device {result.device}, batches {result.batch[0]} (evaluation) / {result.batch[1]} (training), "
        f"{result.activation_mb:.1f} MB of activations per image"
    )
    extra = f", lr {result.lr:g}, kept epoch {result.kept_epoch} of {result.epochs}" if result.lr else ""
    if result.plan is not None:
        extra += f"; the time limit used {result.trained_on} of its {result.images - result.held_out} training images"
    console.print(f"calibrated on {result.images} images in {result.seconds:.0f} s{extra}; wrote {output}")
    return common.EXIT_OK


def _figures(result, who: str):
    """The held-out figures of the teacher, the converted and the calibrated model: a rich Table."""
    from rich.table import Table

    chose = (
        " (held out from training; they also chose the learning rate and whether to keep the schedule's end, "
        "so these figures lean optimistic: measure on other images with aa-deploy consistency)"
        if result.method == "distill"
        else " (held out from the refit; they chose nothing)"
    )
    table = Table(
        title=f"calibration ({result.method}) on {result.held_out} held-out images{chose}", title_justify="left"
    )
    measured = list(result.after.consistency)
    for column in ("model", "fidelity %", "agreement %", *(f"consistency % ({name})" for name in measured)):
        table.add_column(column)
    for name, row in (
        (who.removeprefix("the "), result.teacher),
        ("converted", result.before),
        ("calibrated", result.after),
    ):
        table.add_row(name, _pct(row.fidelity), _pct(row.agreement), *(_pct(row.consistency.get(m)) for m in measured))
    return table


def time_plan(plan, after_start: bool = False, remeasured: float | None = None) -> str:
    """The plan's one line: how the limit's minutes will be spent, step by step."""
    sizes, seconds = plan.sizes, plan.seconds

    def minutes(step: str) -> str:
        return f"{seconds[step] / 60:.1f} min"

    if after_start:
        head = "  replanned after the start"
    elif remeasured is not None:
        head = f"  replanned after the opening figures (x{remeasured:.2f} their estimate)"
    else:
        head = f"  time limit {plan.limit / 60:g} min"
    first = after_start or remeasured is not None
    parts = [f"{plan.spent / 60:.1f} min gone" if first else f"{plan.spent / 60:.1f} min spent measuring"]
    if "held-out figures" in seconds:
        parts.append(f"held-out figures on {plan.held_out} images ~{minutes('held-out figures')}")
    if not after_start:
        parts.append(f"closed-form start on {sizes.start_images} images ~{minutes('start')}")
    if sizes.distill:
        what = "decoding and teacher targets" if plan.targets else "decoding"
        parts.append(f"{what} for {sizes.train_images} training images ~{minutes('targets')}")
        parts.append(
            f"range test ({sizes.probe_images} images, {sizes.range_steps} steps a rate) ~{minutes('range test')}"
        )
        parts.append(
            f"distillation on {sizes.train_images} images ~{minutes('distillation')} (about {plan.epochs} epochs)"
        )
    else:
        parts.append("no distillation (not two epochs of one batch fit: the start is the result)")
    parts.append(f"final figures ~{minutes('final figures')}")
    return f"{head}: " + "; ".join(parts)


def _word(lo: float, hi: float) -> str:
    return "BETTER" if lo > 0 else "WORSE" if hi < 0 else "not resolved"


def _teacher_word(teacher) -> str:
    """How the reports name the teacher: the original, or the dense teacher (a dense conversion of it)."""
    return "the dense teacher" if model_io.sites_where(model_io.load_proto(teacher), "dense") else "the original"


def verdict(result: CalibrationResult, who: str = "the original") -> str:
    """One clause per consistency protocol (better / not resolved / worse, by the paired interval over
    the held-out images) and the agreement with the teacher's answers (`who`; no labels: no top-1)."""
    parts = [
        f"{name} consistency {_word(*d.ci95)} ({100 * d.delta:+.1f}, {100 * d.ci95[0]:+.1f} to {100 * d.ci95[1]:+.1f})"
        for name, d in result.versus_teacher.items()
    ]
    if result.after.fidelity is not None:
        parts.append(f"answers as {who}'s on {100 * result.after.fidelity:.1f} % of shifted views")
    return "; ".join(parts)


def _event(console: Console, event: object) -> None:
    """calibrate's events beyond the bars: the time plan, the epochs expected, each epoch's figures."""
    if isinstance(event, Planned):
        if event.plan.limit is not None:
            console.print(time_plan(event.plan, event.after_start, event.remeasured))
    elif isinstance(event, ThreadsFitted):
        fit = event.fit
        timed = ", ".join(f"{n} thread{'s' if n > 1 else ''} {1000 * t:.0f} ms" for n, t in fit.seconds.items())
        console.print(
            f"  {fit.threads} CPU thread{'s' if fit.threads > 1 else ''} from here, not {fit.previous}: other "
            f"processes keep {fit.busy:.1f} cores busy (the student's forward on a few images: {timed})"
        )
    elif isinstance(event, EpochsPlanned):
        console.print(
            f"  expected: {event.epochs} epochs of about {event.epoch_seconds:.0f} s, "
            f"{event.seconds / 60:.1f} minutes of distillation (from the range test's steps)"
        )
    elif isinstance(event, Epoch):
        if event.epoch == 0:
            console.print(f"  learning rate {event.lr:g}")
        loss = "" if event.loss is None else f", loss {event.loss:.3f}"
        of = f" of {event.planned}" if event.planned is not None else ""
        f = event.figures
        consistency = " / ".join(_pct(value) for value in f.consistency.values())
        console.print(
            f"  epoch {event.epoch}{of}: held-out fidelity {100 * f.fidelity:.1f}%, consistency {consistency}, "
            f"score {f.score:.3f}{loss}"
        )


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"
