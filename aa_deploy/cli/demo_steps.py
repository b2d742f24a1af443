"""`aa-deploy demo`: the whole chain on the bundled trained CIFAR-10 ResNet-20 and its test images."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from aa_deploy.calibration.calibrate import Data, Training, calibrate
from aa_deploy.cli.common import EXIT_NOTHING, EXIT_OK, progress_bars
from aa_deploy.common import bundled, model_io
from aa_deploy.consistency import measure
from aa_deploy.consistency.oscillation import oscillation, paired_oscillation
from aa_deploy.consistency.paired import paired_difference
from aa_deploy.consistency.plots import plot_probe, plot_shift_curve
from aa_deploy.consistency.probe import probe
from aa_deploy.conversion.graph_pass import convert
from aa_deploy.conversion.plan import Options
from aa_deploy.converters.export import export
from aa_deploy.converters.onnxruntime import OnnxRuntimeRunner
from aa_deploy.twin.network import antialias_with
from aa_deploy.twin.weights import load_folded_weights

CALIBRATION_CROPS = 1000
# tune in the demo: multiply-adds at most x2.5, the search within TUNE_MINUTES, and the candidates that do not
# distill (distillation learns the calibration images themselves: photo crops here, not CIFAR images).
TUNE_BUDGET = 2.5
TUNE_MINUTES = 2
TUNE_CANDIDATES = ("dense-1", "dense-2", "blur+refit")
FINAL_PASSES = 50  # pairs per image in the final table: 100 images, the shifts drawn cease to matter


def run_demo(console: Console, workdir: Path | None = None, crops: int = CALIBRATION_CROPS) -> int:
    """Export -> convert -> calibrate -> parity against PyTorch -> accuracy and shift consistency, with
    each model's paired difference from the original; prints a table."""
    import time

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = workdir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        model = bundled.resnet20()
        images, labels = bundled.cifar_test_images()
        x = bundled.cifar_normalize(images)
        options = Options(filter="triangle")
        original, converted = _export_and_convert(console, folder, model, options)
        calibrated = _calibrate(console, folder, original, converted, crops)
        runners, errors = _verify(console, model, options, (original, converted, calibrated), x)
        _measure(console, options, runners, errors, images, labels, x)
        _aliasing_and_shift_curve(console, folder, original, calibrated, runners[0], runners[2], x, images, labels)
        _tune(console, folder, original, runners[0], images, labels, crops)
        console.print(f"demo finished in {time.perf_counter() - start:.0f} s")
        if workdir:
            console.print(f"models and figures kept in {workdir}")
        return EXIT_OK if max(errors) < 1e-3 else EXIT_NOTHING


def _export_and_convert(console: Console, folder: Path, model, options: Options) -> tuple[Path, Path]:
    """Steps 1 and 2: the bundled ResNet-20 exported, then converted."""
    console.print("1/7 export: bundled CIFAR-10 ResNet-20 (trained) -> ONNX (dynamo exporter)")
    original = export(model, folder / "resnet20.onnx", (2, 3, 32, 32))
    console.print(f"2/7 convert --filter {options.filter} (mode {options.mode}, pad {options.pad})")
    converted = folder / "resnet20.aa.onnx"
    result = convert(original, converted, options)
    console.print(f"    {len(result.changed)} of {len(result.actions)} sites changed, {result.blurs} blur nodes")
    return original, converted


def _calibrate(console: Console, folder: Path, original: Path, converted: Path, crops: int) -> Path:
    """Step 3: the converted model refit against the original on crops of the bundled photos."""
    from PIL import Image

    console.print(
        f"3/7 calibrate --method reconstruct --rescale-after-blur: each layer refit against the original on "
        f"{crops} unlabeled 32-px crops of the six bundled public-domain photos (no CIFAR image is used)"
    )
    calib = folder / "calib"
    calib.mkdir(exist_ok=True)
    for i, crop in enumerate(bundled.photo_crops(crops, 32)):
        Image.fromarray(crop).save(calib / f"{i:04d}.png")
    calibrated = folder / "resnet20.aa.cal.onnx"
    # The refit alone, not calibrate's default (a start, then distillation): distillation learns the
    # calibration images themselves, photo crops here, not CIFAR images. The two convs that read a blur
    # are rescaled, not refit (a refit kernel sharpens itself to undo the blur). docs/results.md,
    # "Calibrating on images that may ship".
    training = Training(method="reconstruct", rescale_after_blur=True)
    with progress_bars(console) as progress:
        report = calibrate(converted, original, Data(calib), calibrated, training, progress=progress)
    console.print(f"    {report.seconds:.0f} s")
    return calibrated


def _verify(console: Console, model, options: Options, paths: tuple[Path, Path, Path], x: np.ndarray):
    """Step 4: each ONNX file in ONNX Runtime against its PyTorch model (the original, the twin, the twin with
    the calibrated weights); the runners and the largest differences."""
    original, converted, calibrated = paths
    console.print("4/7 verify: ONNX Runtime vs the PyTorch models on the 100 bundled test images")
    twin, _ = antialias_with(model, options)
    # The calibrated graph's reference: the twin with the calibrated (BatchNorm-folded) weights put back.
    calibrated_twin, _ = antialias_with(model, options)
    load_folded_weights(calibrated_twin, model_io.load(calibrated), torch.from_numpy(x[:2]))
    with torch.no_grad():
        refs = [m(torch.from_numpy(x)).numpy() for m in (model, twin, calibrated_twin)]
    runners = [OnnxRuntimeRunner(p) for p in paths]
    return runners, [float(np.abs(run(x) - ref).max()) for run, ref in zip(runners, refs)]


def _measure(console: Console, options: Options, runners, errors, images, labels, x) -> None:
    """Step 5: top-1 and the two consistencies of each model, paired against the original's."""
    console.print("5/7 measure: top-1, pad-and-crop consistency (+-4 px), circular-shift consistency (+-2 px)")
    table = Table(title="ResNet-20 on 100 real CIFAR-10 test images", title_justify="left")
    columns = (
        "model",
        "top-1 %",
        "pad-and-crop consistency %",
        "vs original (95% CI)",
        "circular consistency %",
        "vs original (95% CI)",
        "max |ONNX - PyTorch|",
    )
    for column in columns:
        table.add_column(column)
    names = ("original", f"converted ({options.filter})", "converted + calibrated")
    base = None
    for name, run, err in zip(names, runners, errors):
        acc = 100.0 * float((run(x).argmax(1) == labels).mean())
        crop = measure("random-crop", run, bundled.cifar_normalize, images, crop=32, shift=4, pad="zero", passes=10)
        circ = measure("circular", run, bundled.cifar_normalize, images, crop=32, shift=2, passes=10)
        base = base or (crop, circ)
        cells = []
        for measured, first in zip((crop, circ), base):
            d = paired_difference(first, measured) if measured is not first else None
            vs = "" if d is None else f"{100 * d.delta:+.1f} ({100 * d.ci95[0]:+.1f} to {100 * d.ci95[1]:+.1f})"
            cells += [f"{100 * measured.consistency:.1f}", vs]
        table.add_row(name, f"{acc:.1f}", *cells, f"{err:.1e}")
    console.print(table)
    console.print(
        "converted: the blur inserted into a network trained without it costs accuracy. "
        "converted + calibrated: the same graph with its weights refit to the original's outputs on "
        "unlabeled photo crops (the convs that read a blur only rescaled). vs original: the paired difference over the same images and shifts, with its 95 % interval."
    )


def _aliasing_and_shift_curve(console, folder, original, calibrated, run_original, run_calibrated, x, images, labels):
    """Step 6: the probe at every site and the diagonal-shift curve, original against converted +
    calibrated, as a table, two PNGs in `folder` and one line on what 100 images resolve."""
    console.print(
        "6/7 where the aliasing goes: each site's aliased energy and one-pixel error (aa-deploy probe), and the "
        "probability of the correct class as the image rolls diagonally pixel by pixel"
    )
    names = ("original", "converted + calibrated")
    probes = dict(zip(names, (probe(original, x), probe(calibrated, x))))
    table = Table(title="aliasing per site on the 100 test images", title_justify="left")
    for column in ("#", "site", "kind", "stride", "aliased energy % (original -> calibrated)", "one-pixel error"):
        table.add_column(column)
    for a, b in zip(*probes.values()):
        table.add_row(
            str(a.index), a.node, a.kind, "x".join(map(str, a.strides)),
            f"{100 * a.aliasing:.1f} -> {100 * b.aliasing:.1f}",
            f"{a.subpixel_error:.3f} -> {b.subpixel_error:.3f}" if a.subpixel_error is not None else "-",
        )  # fmt: skip
    console.print(table)
    period = max(max(p.cumulative_stride or [1]) for p in probes["original"])  # the network's total stride
    curves = {
        name: measure(
            "diagonal", run, bundled.cifar_normalize, images, crop=32, shift=2 * period, labels=labels, circular=True
        )
        for name, run in zip(names, (run_original, run_calibrated))
    }
    plot_probe(probes, folder / "aliasing.png", "aliasing before each subsampling, ResNet-20 (100 CIFAR-10 images)")
    plot_shift_curve(curves, folder / "diagonal.png", "ResNet-20 as the image rolls diagonally (100 CIFAR-10 images)")
    swing = {name: oscillation(r, period) for name, r in curves.items()}
    delta, ci = paired_oscillation(curves[names[0]], curves[names[1]], period)
    resolved = "resolved" if ci[0] > 0 or ci[1] < 0 else "not resolved on 100 images"
    lower = all(b.aliasing < a.aliasing for a, b in zip(*probes.values()))
    console.print(
        f"resolves: the aliased energy at every site ({'lower after calibration at each' if lower else 'see the table'}; "
        "a spectrum, not a vote of images); the swing of p(correct class) over one period of the total stride "
        f"({period} px): original {_swing(swing[names[0]])}, calibrated {_swing(swing[names[1]])}, difference "
        f"{100 * delta:+.1f} points ({100 * ci[0]:+.1f} to {100 * ci[1]:+.1f}), {resolved}. Does not resolve: a "
        "consistency difference of a point or two (the table above; 100 images span about +-2). "
        f"Figures: {folder / 'aliasing.png'}, {folder / 'diagonal.png'}"
    )


def _swing(o) -> str:
    return f"{100 * o.amplitude:.1f} points ({100 * o.ci95[0]:.1f} to {100 * o.ci95[1]:.1f})"


def _tune(console: Console, folder: Path, original: Path, run_original, images, labels, crops: int) -> None:
    """Step 7: `aa-deploy tune` on the photo crops (half to calibrate, half to select), then every candidate it
    measured against the original on the 100 test images, which neither calibration nor selection saw."""
    from aa_deploy.tune import Budget, Images, tune
    from aa_deploy.tune import report as tune_report

    console.print(
        f"7/7 tune --max-macs {TUNE_BUDGET} --time-limit {TUNE_MINUTES} --candidates {' '.join(TUNE_CANDIDATES)}: "
        f"the remedies that need no distillation, calibrated on half of the {crops} photo crops and chosen on the "
        "other half (no labels: fidelity decides accuracy, agreement with the original's shift-averaged answer)"
    )
    budget = Budget(max_macs=TUNE_BUDGET, time_limit=60 * TUNE_MINUTES)
    with progress_bars(console) as progress:
        tuned = tune(model_io.load(original), Images(folder / "calib"), budget, only=TUNE_CANDIDATES, progress=progress)
    console.print(tune_report.Frontier(tuned))
    x = bundled.cifar_normalize(images)
    table = Table(
        title=f"the candidates on the 100 CIFAR-10 test images ({FINAL_PASSES} passes; neither calibrated nor "
        "chosen on)",
        title_justify="left",
    )
    protocols = (("pad-and-crop ±4 px", "random-crop", {"shift": 4, "pad": "zero", "passes": FINAL_PASSES}),
                 ("one-pixel", "one-pixel", {"shift": 8, "pad": "zero"}))  # fmt: skip
    for column in ("model", "top-1 %", *(f"{p} {c}" for p, *_ in protocols for c in ("%", "vs original (95% CI)")), ""):
        table.add_column(column)
    runs = [("original", run_original)]
    for name, model in tuned.measured.items():
        path = folder / f"resnet20.{name.replace(' ', '').replace('+', '_')}.onnx"
        model_io.save(model, path, external=False)
        runs.append((name, OnnxRuntimeRunner(path)))
    base = None
    for name, run in runs:
        acc = 100.0 * float((run(x).argmax(1) == labels).mean())
        found = [
            measure(protocol, run, bundled.cifar_normalize, images, crop=32, **kw) for _, protocol, kw in protocols
        ]
        cells = []
        for i, m in enumerate(found):
            vs = "" if base is None else _vs(paired_difference(base[i], m))
            cells += [f"{100 * m.consistency:.1f}", vs]
        base = base or found
        chosen = tuned.chosen is not None and name == tuned.chosen.name
        table.add_row(name, f"{acc:.1f}", *cells, "chosen" if chosen else "")
    console.print(table)
    console.print(
        "photo crops are not CIFAR images: the original's answers on them are unsure, and what the selection "
        "half shows need not hold on CIFAR images. Choose on images of the kind the model serves "
        "(aa-deploy tune --images, ideally with --labels)."
    )


def _vs(d) -> str:
    return f"{100 * d.delta:+.1f} ({100 * d.ci95[0]:+.1f} to {100 * d.ci95[1]:+.1f})"
