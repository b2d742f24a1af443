"""`aa-deploy demo`: the whole chain on the bundled trained CIFAR-10 ResNet-20 and its test images."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from aa_deploy import bundled
from aa_deploy.cli.common import EXIT_NOTHING, EXIT_OK
from aa_deploy.consistency import measure
from aa_deploy.convert import convert
from aa_deploy.plan import Options
from aa_deploy.torch import antialias_with


def run_demo(console: Console, workdir: Path | None = None) -> int:
    """Export -> convert -> parity against the twin -> accuracy and shift consistency; prints a table."""
    from converters.export import export
    from converters.onnxruntime import OnnxRuntimeRunner

    with tempfile.TemporaryDirectory() as tmp:
        folder = workdir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        model = bundled.resnet20()
        images, labels = bundled.cifar_test_images()
        x = bundled.cifar_normalize(images)
        options = Options(filter="triangle")

        console.print("1/4 export: bundled CIFAR-10 ResNet-20 (trained) -> ONNX (dynamo exporter)")
        original = export(model, folder / "resnet20.onnx", (2, 3, 32, 32))
        console.print(f"2/4 convert --filter {options.filter} (mode {options.mode}, pad {options.pad})")
        result = convert(original, folder / "resnet20.aa.onnx", options)
        console.print(f"    {len(result.changed)} of {len(result.actions)} sites changed, {result.blurs} blur nodes")

        console.print("3/4 verify: ONNX Runtime vs PyTorch on the 100 bundled test images")
        twin, _ = antialias_with(model, options)
        with torch.no_grad():
            ref_plain = model(torch.from_numpy(x)).numpy()
            ref_twin = twin(torch.from_numpy(x)).numpy()
        run_plain = OnnxRuntimeRunner(original)
        run_aa = OnnxRuntimeRunner(folder / "resnet20.aa.onnx")
        err_plain = float(np.abs(run_plain(x) - ref_plain).max())
        err_aa = float(np.abs(run_aa(x) - ref_twin).max())

        console.print("4/4 measure: top-1, pad-and-crop consistency (+-4 px), circular-shift consistency (+-2 px)")
        table = Table(title="ResNet-20 on 100 real CIFAR-10 test images", title_justify="left")
        columns = (
            "model",
            "top-1 %",
            "consistency % (pad-and-crop)",
            "consistency % (circular)",
            "max |ONNX - PyTorch|",
        )
        for column in columns:
            table.add_column(column)
        for name, run, err in (
            ("original", run_plain, err_plain),
            (f"anti-aliased ({options.filter})", run_aa, err_aa),
        ):
            acc = 100.0 * float((run(x).argmax(1) == labels).mean())
            crop = measure("random-crop", run, bundled.cifar_normalize, images, crop=32, shift=4, pad="zero")
            circ = measure("circular", run, bundled.cifar_normalize, images, crop=32, shift=2)
            table.add_row(
                name, f"{acc:.1f}", f"{100 * crop.consistency:.1f}", f"{100 * circ.consistency:.1f}", f"{err:.1e}"
            )
        console.print(table)
        console.print(
            "Blur inserted without adapting the weights costs accuracy on an already-trained network; "
            "`aa-deploy calibrate` on unlabeled training images wins it back to within a point of top-1 (see README: Calibrate)."
        )
        if workdir:
            console.print(f"models kept in {workdir}")
        return EXIT_OK if max(err_plain, err_aa) < 1e-3 else EXIT_NOTHING
