"""The `aa-deploy` command line: parse, call the library, print, exit.

Exit codes: 0 done, 1 nothing to do or a check failed, 2 bad input or usage.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rich.console import Console

from aa_deploy.errors import InputError
from aa_deploy.plan import MODES, PADS, Options
from aa_deploy.version import __version__

EXIT_OK, EXIT_NOTHING, EXIT_INPUT = 0, 1, 2


def _add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--filter", choices=["rect", "triangle", "binomial"], help="blur filter (default: triangle)")
    p.add_argument("--filter-size", type=int, metavar="N", help="binomial row of N taps, 1..7 (overrides --filter)")
    p.add_argument(
        "--mode", default="auto", choices=MODES, help="pre, blurpool, or auto: blurpool for pooling, pre elsewhere"
    )
    p.add_argument("--pad", default="reflect", choices=PADS, help="padding of the blur (default: reflect)")
    p.add_argument("--skip-stem", action="store_true", help="leave the first downsampling site untouched")
    p.add_argument("--include", metavar="REGEX", help="only sites whose node name or module scope matches")
    p.add_argument("--exclude", metavar="REGEX", help="leave out sites whose node name or module scope matches")


def _add_preprocess(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", type=int, help="image size after resize and centre crop (default: the model's input size)")
    p.add_argument("--mean", help="normalization mean, e.g. 0.485,0.456,0.406 (default: ImageNet's)")
    p.add_argument("--std", help="normalization std, e.g. 0.229,0.224,0.225 (default: ImageNet's)")
    p.add_argument("--preprocess", help="JSON file with size, resize, mean, std")


def _preprocess(args: argparse.Namespace, default_size: int | None = None):
    """The user's preprocessing (file, or --size/--mean/--std), or None to let the command decide."""
    from calibration.images import Preprocess

    if args.preprocess:
        return Preprocess.from_file(args.preprocess)
    if not (args.size or args.mean or args.std):
        return None
    try:
        kw: dict = {"size": args.size or default_size or 224}
        kw |= {"mean": tuple(float(v) for v in args.mean.split(","))} if args.mean else {}
        kw |= {"std": tuple(float(v) for v in args.std.split(","))} if args.std else {}
    except ValueError:
        raise InputError("--mean/--std take three comma-separated numbers") from None
    return Preprocess(**kw)


def _options(args: argparse.Namespace) -> Options:
    try:
        return Options(
            args.filter or "triangle", args.filter_size, args.mode, args.pad, args.skip_stem, args.include, args.exclude
        )
    except ValueError as e:
        raise InputError(str(e)) from None


def _inspect(args: argparse.Namespace, console: Console) -> int:
    from aa_deploy import model_io
    from aa_deploy.convert import inspect
    from aa_deploy.report import print_sites

    actions = inspect(model_io.load(args.model), _options(args))
    if args.json:
        print(json.dumps([a.describe() for a in actions], indent=2))
    elif not actions:
        console.print(f"{args.model}: no downsampling sites found")
    else:
        print_sites(
            actions,
            f"{args.model}: {len(actions)} sites, {sum(a.action != 'skip' for a in actions)} to change",
            console,
        )
    return EXIT_OK if actions else EXIT_NOTHING


def _convert(args: argparse.Namespace, console: Console) -> int:
    from aa_deploy.convert import convert
    from aa_deploy.report import print_sites

    if args.output is None and not args.in_place:
        raise InputError("give an output file with -o FILE (or --in-place to overwrite the input)")
    start = time.perf_counter()
    result = convert(args.model, args.output, _options(args), in_place=args.in_place, check=not args.no_check)
    seconds = time.perf_counter() - start
    out = args.model if args.in_place else args.output
    if not args.quiet:
        print_sites(result.actions, f"{args.model} -> {out}", console)
    changed = len(result.changed)
    if result.blurs == 0:
        console.print(
            f"nothing added: none of the {len(result.actions)} sites needed a blur (see the table); wrote {out}"
        )
    else:
        console.print(
            f"changed {changed} of {len(result.actions)} sites with {result.blurs} blur nodes "
            f"in {seconds:.2f} s; wrote {out}"
        )
    return EXIT_OK


def _shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(d) for d in text.lower().replace(",", "x").split("x"))
    except ValueError:
        raise InputError(f"bad shape {text!r}: write it as 3x224x224") from None


def _export(args: argparse.Namespace, console: Console) -> int:
    from converters.export import export, load_model

    model, trained = load_model(args.model, args.weights)
    shape = _shape(args.input_shape) or ((3, 32, 32) if args.model.startswith("aa:") else (3, 224, 224))
    export(model, args.output, (2, *shape), dynamic_batch=not args.static_batch, opset=args.opset)
    weights = "trained weights" if trained else "RANDOM weights (no --weights given; seeded, so verify rebuilds them)"
    console.print(
        f"exported {args.model} with {weights}, input N x {'x'.join(map(str, shape))}, "
        f"opset {args.opset} -> {args.output}"
    )
    return EXIT_OK


def _verify(args: argparse.Namespace, console: Console) -> int:
    from aa_deploy.parity import DEFAULT_TOLERANCE, Tolerance, verify, write_json, write_junit

    base = DEFAULT_TOLERANCE.get(args.precision)
    if base is None:
        raise InputError(f"precision must be one of {', '.join(DEFAULT_TOLERANCE)}")
    tol = Tolerance(
        args.atol if args.atol is not None else base.atol,
        args.rtol if args.rtol is not None else base.rtol,
        args.min_top1 if args.min_top1 is not None else base.min_top1,
        args.min_cosine if args.min_cosine is not None else base.min_cosine,
    )
    options = _options(args) if args.antialiased and (args.filter or args.filter_size) else None
    preprocess = _preprocess(args)
    result = verify(
        args.model,
        args.reference,
        antialiased=True if args.antialiased else (False if args.plain else None),
        options=options,
        change=args.change,
        backend=args.backend,
        provider=args.provider,
        precision=args.precision,
        tolerance=tol,
        images=args.images,
        preprocess=preprocess,
        count=args.count,
        seed=args.seed,
        input_shape=_shape(args.input_shape),
        weights=args.weights,
    )
    from aa_deploy.report import print_parity

    print_parity(result, console)
    if args.report:
        write_json(result, args.report)
    if args.junit:
        write_junit(result, args.junit)
    return EXIT_OK if result.passed else EXIT_NOTHING


def _consistency(args: argparse.Namespace, console: Console) -> int:
    import json

    from aa_deploy.consistency.compare import compare
    from aa_deploy.report import print_consistency

    preprocess = _preprocess(args, args.crop)
    models = [args.model, *(args.compare or [])]
    results, data = compare(
        models,
        progress=_progress_bar(console, "views"),
        labels=args.labels,
        images=args.images,
        protocol=args.protocol,
        shift=args.shift,
        crop=args.crop,
        passes=args.passes,
        seed=args.seed,
        pad=args.pad,
        preprocess=preprocess,
        batch=args.batch,
        provider=args.provider,
        backend=args.backend,
        limit=args.limit,
    )
    print_consistency(results, data.source, console)
    if args.report:
        from aa_deploy.atomic import write_text

        payload = {
            "schema": "aa-deploy.consistency/1",
            "protocol": args.protocol,
            "images": data.source,
            "models": {name: r.as_dict() for name, r in results.items()},
        }
        write_text(args.report, json.dumps(payload, indent=2) + "\n")
    if args.plot:
        from aa_deploy.consistency.plots import plot

        plot({Path(n).name: r for n, r in results.items()}, args.plot, f"{args.protocol} on {Path(data.source).name}")
    return EXIT_OK


def _progress_bar(console: Console, unit: str):
    """A factory for `with factory(total) as advance: advance(n)`: a rich bar on a terminal, nothing elsewhere."""
    from contextlib import contextmanager

    @contextmanager
    def bar(total: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
            disable=not console.is_terminal,
        ) as progress:
            task = progress.add_task(unit, total=total)
            yield lambda n: progress.advance(task, n)

    return bar


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _probe(args: argparse.Namespace, console: Console) -> int:
    import json

    from rich.table import Table

    from aa_deploy.consistency.compare import load_images
    from aa_deploy.consistency.probe import probe
    from aa_deploy.parity import input_spec

    dims = input_spec(args.model)[1]
    size = dims[-1] if isinstance(dims[-1], int) and dims[-1] > 0 else 224
    data = load_images(
        args.images or ("bundled:cifar10" if size == 32 else "bundled:photos"),
        crop=size,
        shift=0,
        pad=None if size != 32 else "zero",
        preprocess=_preprocess(args, size),
        limit=args.count,
    )
    x = data.prepare(data.images[:, : data.crop, : data.crop])
    results = {m: probe(m, x) for m in [args.model, *(args.compare or [])]}
    table = Table(title=f"aliasing per site on {len(x)} images from {data.source}", title_justify="left")
    for column in (
        "#",
        "site",
        "kind",
        "stride",
        "cum. stride",
        *(f"{Path(m).name}: alias % / equiv. / 1-px" for m in results),
    ):
        table.add_column(column)
    base = next(iter(results.values()))
    for i, p in enumerate(base):
        cells = []
        for probes in results.values():
            q = probes[i] if i < len(probes) else None
            cells.append(
                "-"
                if q is None
                else f"{100 * q.aliasing:.1f} / {_num(q.equivariance_error)} / {_num(q.subpixel_error)}"
            )
        table.add_row(
            str(i),
            p.node,
            p.kind,
            "x".join(map(str, p.strides)),
            "x".join(map(str, p.cumulative_stride or [])) or "-",
            *cells,
        )
    console.print(table)
    if args.report:
        from aa_deploy.atomic import write_text

        payload = {
            "schema": "aa-deploy.probe/1",
            "images": data.source,
            "count": len(x),
            "models": {m: [p.as_dict() for p in probes] for m, probes in results.items()},
        }
        write_text(args.report, json.dumps(payload, indent=2) + "\n")
    if args.plot:
        from aa_deploy.consistency.plots import plot_probe

        plot_probe({Path(m).name: r for m, r in results.items()}, args.plot, f"aliasing per site ({data.source})")
    return EXIT_OK


def _quantize(args: argparse.Namespace, console: Console) -> int:
    from aa_deploy.parity import input_spec
    from calibration.images import preprocess_for
    from calibration.int8 import calibration_inputs, quantize

    dims = input_spec(args.model)[1]
    size = dims[-1] if isinstance(dims[-1], int) and dims[-1] > 0 else None
    x = calibration_inputs(args.calib_images, preprocess_for(size, _preprocess(args, size)), limit=args.limit)
    kept = quantize(args.model, args.output, x, per_channel=not args.per_tensor)
    console.print(
        f"INT8 Q/DQ ({'per-tensor' if args.per_tensor else 'per-channel'}, symmetric) calibrated on {len(x)} images; "
        f"{len(kept)} blur nodes kept exact in float; wrote {args.output}"
    )
    return EXIT_OK


def _build(args: argparse.Namespace, console: Console) -> int:
    from converters.tensorrt import build_engine, parse_shapes

    shapes = parse_shapes(args.shapes)
    out = Path(args.output)
    graph = Path(args.model)
    if args.precision == "fp16":
        from converters.precision import to_fp16

        graph = out.with_suffix(".fp16.onnx")
        kept = to_fp16(args.model, graph)
        console.print(f"FP16 graph ({len(kept)} blurs kept in float32 to stay exact) -> {graph}")
    elif args.precision == "int8":
        if not args.calib_images:
            raise InputError("--precision int8 needs --calib-images DIR")
        from calibration.images import preprocess_for
        from calibration.int8 import calibration_inputs, quantize

        graph = out.with_suffix(".int8.onnx")
        size = next(iter(shapes.values()))[1][-1]
        x = calibration_inputs(args.calib_images, preprocess_for(size, _preprocess(args, size)), limit=args.limit)
        quantize(args.model, graph, x)
        console.print(f"INT8 Q/DQ graph calibrated on {len(x)} images -> {graph}")
    try:
        sidecar = build_engine(graph, out, shapes, args.precision, args.timing_cache)
    except InputError as e:
        ready = f"; the {args.precision} graph is ready at {graph}" if graph != Path(args.model) else ""
        raise InputError(f"{e}{ready}") from None
    console.print(f"TensorRT {sidecar.tensorrt_version} engine ({args.precision}) -> {out}, sidecar {out}.json")
    return EXIT_OK


def _calibrate(args: argparse.Namespace, console: Console) -> int:
    from rich.table import Table

    from calibration.calibrate import calibrate

    preprocess = _preprocess(args)

    def progress(h: dict) -> None:
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
            f"{100 * row['consistency_pad_crop']:.1f}",
            f"{100 * row['consistency_circular']:.1f}",
        )
    console.print(table)
    extra = f", lr {result.lr:g}, best epoch {result.best_epoch} of {result.epochs}" if result.lr else ""
    console.print(f"calibrated on {result.images} images in {result.seconds:.0f} s{extra}; wrote {args.output}")
    return EXIT_OK


def _demo(args: argparse.Namespace, console: Console) -> int:
    from aa_deploy.demo import run_demo

    return run_demo(console, Path(args.workdir) if args.workdir else None)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aa-deploy", description="Anti-alias the downsampling of exported vision models.")
    p.add_argument("--version", action="version", version=f"aa-deploy {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("inspect", help="list every downsampling site and what convert would do")
    q.add_argument("model")
    q.add_argument("--json", action="store_true", help="print the plan as JSON")
    _add_options(q)
    q.set_defaults(run=_inspect)

    c = sub.add_parser("convert", help="insert blur nodes at the downsampling sites of an ONNX model")
    c.add_argument("model")
    c.add_argument("-o", "--output", help="output ONNX file (written atomically)")
    c.add_argument("--in-place", action="store_true", help="overwrite the input model")
    c.add_argument("--no-check", action="store_true", help="skip onnx.checker on the output")
    c.add_argument("-q", "--quiet", action="store_true", help="no site table")
    _add_options(c)
    c.set_defaults(run=_convert)

    e = sub.add_parser("export", help="export a PyTorch model to ONNX (torch.onnx dynamo exporter)")
    e.add_argument("model", help="timm:NAME, torchvision:NAME, aa:cifar10_resnet20 or package.module:factory")
    e.add_argument("-o", "--output", required=True)
    e.add_argument("--weights", help="checkpoint (state_dict) to load; without it the weights are random")
    e.add_argument("--input-shape", metavar="CxHxW", help="input shape without batch (default 3x224x224)")
    e.add_argument("--static-batch", action="store_true", help="no dynamic batch axis")
    e.add_argument("--opset", type=int, default=18)
    e.set_defaults(run=_export)

    v = sub.add_parser("verify", help="numerical parity of an ONNX model against its PyTorch reference")
    v.add_argument("model")
    v.add_argument("--reference", required=True, help="timm:NAME, torchvision:NAME, aa:NAME or package.module:factory")
    v.add_argument("--weights", help="checkpoint for the reference")
    g = v.add_mutually_exclusive_group()
    g.add_argument(
        "--antialiased",
        action="store_true",
        help="compare with the twin (default when the model records aa-deploy options)",
    )
    g.add_argument("--plain", action="store_true", help="compare with the plain model")
    g.add_argument(
        "--change",
        action="store_true",
        help="report how much conversion changed the outputs vs the plain model (never fails)",
    )
    v.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "tensorrt"])
    v.add_argument(
        "--provider", default="cpu", choices=["cpu", "cuda", "tensorrt"], help="ONNX Runtime execution provider"
    )
    v.add_argument("--precision", default="fp32", help="fp32, fp16 or int8: picks the default tolerances")
    v.add_argument("--atol", type=float)
    v.add_argument("--rtol", type=float)
    v.add_argument("--min-top1", type=float, help="least top-1 agreement for classifier outputs")
    v.add_argument("--min-cosine", type=float, help="least per-sample cosine similarity")
    v.add_argument("--images", help="image folder, or bundled:cifar10 (default: deterministic random inputs)")
    v.add_argument(
        "--count", type=int, default=8, help="number of inputs (random) or at most this many images (0: all)"
    )
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--input-shape", metavar="CxHxW", help="for models with dynamic spatial dims")
    _add_preprocess(v)
    v.add_argument("--report", help="write the JSON report here")
    v.add_argument("--junit", help="write a JUnit XML file here")
    _add_options(v)
    v.set_defaults(run=_verify)

    m = sub.add_parser("consistency", help="shift consistency of ONNX models on real images")
    m.add_argument("model", help="the baseline ONNX model (e.g. the original)")
    m.add_argument("--compare", nargs="+", metavar="MODEL", help="models to compare with it (e.g. converted)")
    m.add_argument("--images", help="image folder, bundled:cifar10 or bundled:photos (default: by input size)")
    m.add_argument("--labels", help="CSV of file,label rows (class indices) for accuracy; else folder-per-class")
    m.add_argument("--protocol", default="random-crop", choices=["random-crop", "circular", "diagonal", "worst-case"])
    m.add_argument("--shift", type=int, help="largest shift in pixels (default 32, or 4 for pad-and-crop, 2 circular)")
    m.add_argument("--crop", type=int, help="view size (default: the model's input size)")
    m.add_argument(
        "--pad", choices=["reflect", "zero", "replicate"], help="pad-and-crop shifts with this padding (small images)"
    )
    m.add_argument("--passes", type=int, default=5, help="passes of random pairs (random-crop, circular)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--limit", type=int, help="use at most this many images")
    m.add_argument("--batch", type=int, default=64)
    m.add_argument(
        "--backend", default="onnxruntime", choices=["onnxruntime", "tensorrt"], help="tensorrt: the models are engines"
    )
    m.add_argument(
        "--provider", default="cpu", choices=["cpu", "cuda", "tensorrt"], help="ONNX Runtime execution provider"
    )
    _add_preprocess(m)
    m.add_argument("--report", help="write the JSON report here")
    m.add_argument("--plot", help="write a PNG plot here")
    m.set_defaults(run=_consistency)

    r = sub.add_parser("probe", help="where the aliasing happens: per-site spectra and shift equivariance")
    r.add_argument("model")
    r.add_argument("--compare", nargs="+", metavar="MODEL", help="converted models to probe at the same sites")
    r.add_argument("--images", help="image folder, bundled:cifar10 or bundled:photos (default: by input size)")
    r.add_argument("--count", type=int, default=32, help="number of images")
    r.add_argument("--report", help="write the JSON report here")
    r.add_argument("--plot", help="write a PNG bar chart here")
    _add_preprocess(r)
    r.set_defaults(run=_probe)

    z = sub.add_parser("quantize", help="INT8 by explicit Q/DQ (TensorRT 10/11, ONNX Runtime), blurs kept exact")
    z.add_argument("model")
    z.add_argument("--calib-images", required=True, help="folder of calibration images (recursive)")
    z.add_argument("-o", "--output", required=True)
    z.add_argument("--limit", type=int, default=500, help="use at most this many images (default 500)")
    z.add_argument("--per-tensor", action="store_true", help="per-tensor instead of per-channel weight scales")
    _add_preprocess(z)
    z.set_defaults(run=_quantize)

    b = sub.add_parser("build", help="TensorRT engine from an ONNX model (precision put into the graph first)")
    b.add_argument("model")
    b.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"])
    b.add_argument(
        "--shapes", required=True, help="NAME:MIN,OPT,MAX shapes, e.g. input:1x3x224x224,8x3x224x224,32x3x224x224"
    )
    b.add_argument("--calib-images", help="calibration images for --precision int8")
    b.add_argument("--limit", type=int, default=500, help="at most this many calibration images")
    b.add_argument("--timing-cache", help="TensorRT timing cache file (read and updated)")
    b.add_argument("-o", "--output", required=True, help="the engine file (a .json sidecar is written beside it)")
    _add_preprocess(b)
    b.set_defaults(run=_build)

    k = sub.add_parser("calibrate", help="win back accuracy after conversion, label-free")
    k.add_argument("model", help="the converted ONNX model")
    k.add_argument("--teacher", required=True, help="the original ONNX model")
    k.add_argument("--images", required=True, help="folder of unlabeled calibration images (recursive)")
    k.add_argument("-o", "--output", required=True)
    k.add_argument("--method", default="distill", choices=["stats", "distill"])
    k.add_argument("--epochs", type=int, default=30, help="most epochs of distillation (early stop decides)")
    k.add_argument("--patience", type=int, default=8, help="stop after this many epochs without better agreement")
    k.add_argument("--lr", type=float, help="learning rate (default: chosen by a short range test)")
    k.add_argument("--limit", type=int, help="use at most this many images")
    k.add_argument("--seed", type=int, default=0)
    k.add_argument(
        "--reinsert-bn", action="store_true", help="train with BatchNorm re-inserted after each conv, folded back"
    )
    k.add_argument(
        "--no-mixup", action="store_true", help="train on shifted images only, without blending pairs of them"
    )
    _add_preprocess(k)
    k.set_defaults(run=_calibrate)

    d = sub.add_parser("demo", help="the whole chain on the bundled trained CIFAR-10 ResNet-20 and test images")
    d.add_argument("--workdir", help="keep the exported and converted models here (default: a temporary folder)")
    d.set_defaults(run=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # Tables need room; a pipe or CI log has no width of its own.
    console = Console(width=None if sys.stdout.isatty() else 200, soft_wrap=True)
    try:
        return args.run(args, console)
    except InputError as e:
        print(f"aa-deploy {args.command}: error: {e}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
