"""`aa-deploy calibrate`: win back accuracy after conversion, label-free."""

from __future__ import annotations

import argparse
from functools import partial

from rich.console import Console

from aa_deploy.calibration.calibrate import METHODS, STARTS, VIEWS, Compute, Data, Training, calibrate
from aa_deploy.calibration.recipe import Recipe
from aa_deploy.calibration.report import CalibrationReport
from aa_deploy.cli import common, events
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
    with common.progress_bars(console, partial(events.show, console)) as progress:
        result = calibrate(
            args.model, args.teacher, data, args.output, training, compute, progress=progress,
            started=common.command_started(),
        )  # fmt: skip
    console.print(CalibrationReport(result, args.output))
    return common.EXIT_OK
