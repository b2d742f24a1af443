"""`aa-deploy calibrate`: win back accuracy after conversion, label-free."""

from __future__ import annotations

import argparse

from rich.console import Console

from aa_deploy.cli import common


def add(sub) -> None:
    k = sub.add_parser("calibrate", help="win back accuracy after conversion, label-free")
    k.add_argument("model", help="the converted ONNX model")
    k.add_argument("--teacher", required=True, help="the original ONNX model")
    k.add_argument("--images", required=True, help="folder of unlabeled calibration images (recursive)")
    k.add_argument("-o", "--output", required=True)
    k.add_argument("--method", default="distill", choices=["stats", "distill"])
    k.add_argument("--epochs", type=int, default=45, help="most epochs of distillation (early stop decides)")
    k.add_argument(
        "--patience",
        type=int,
        help="stop after this many epochs without better agreement (default 12, and at least 300 optimizer steps)",
    )
    k.add_argument("--lr", type=float, help="learning rate (default: chosen by a short range test)")
    k.add_argument("--limit", type=int, help="use at most this many images")
    k.add_argument("--seed", type=int, default=0)
    k.add_argument(
        "--reinsert-bn", action="store_true", help="train with BatchNorm re-inserted after each conv, folded back"
    )
    k.add_argument(
        "--no-mixup", action="store_true", help="train on shifted images only, without blending pairs of them"
    )
    common.add_preprocess(k)
    k.set_defaults(run=run)


def run(args: argparse.Namespace, console: Console) -> int:
    from rich.table import Table

    from calibration.calibrate import calibrate

    preprocess = common.preprocess(args)

    def progress(h: dict) -> None:
        if h["epoch"] == 0:
            console.print(f"  learning rate {h['lr']:g}")
        loss = "" if h["loss"] is None else f", loss {h['loss']:.3f}"
        console.print(f"  epoch {h['epoch']}: held-out agreement with the teacher {100 * h['agreement']:.1f}%{loss}")

    result = calibrate(
        args.model,
        args.teacher,
        args.images,
        args.output,
        method=args.method,
        preprocess=preprocess,
        limit=args.limit,
        max_epochs=args.epochs,
        patience=args.patience,
        lr=args.lr,
        seed=args.seed,
        reinsert_bn=args.reinsert_bn,
        mix=not args.no_mixup,
        progress=progress,
    )
    table = Table(title=f"calibration ({result.method}) on {result.held_out} held-out images", title_justify="left")
    for column in ("model", "agreement with teacher %", "consistency % (pad-and-crop)", "consistency % (circular)"):
        table.add_column(column)
    for name, row in (
        ("original (teacher)", result.teacher),
        ("converted", result.before),
        ("calibrated", result.after),
    ):
        table.add_row(
            name,
            f"{100 * row['agreement']:.1f}",
            *(
                "-" if row[key] is None else f"{100 * row[key]:.1f}"
                for key in ("consistency_pad_crop", "consistency_circular")
            ),
        )
    console.print(table)
    labels = {"consistency_pad_crop": "pad-and-crop", "consistency_circular": "circular"}
    parts = [
        f"{labels[key]} {100 * d['delta']:+.1f} ({100 * d['ci95'][0]:+.1f} to {100 * d['ci95'][1]:+.1f})"
        for key, d in result.versus_teacher.items()
    ]
    if parts:
        console.print(f"consistency, calibrated minus original (paired, 95 % interval over images): {', '.join(parts)}")
    extra = f", lr {result.lr:g}, best epoch {result.best_epoch} of {result.epochs}" if result.lr else ""
    console.print(f"calibrated on {result.images} images in {result.seconds:.0f} s{extra}; wrote {args.output}")
    return common.EXIT_OK
