"""INT8 by explicit quantization: Q/DQ nodes in the ONNX graph (what TensorRT 10/11 and ONNX Runtime run).

Symmetric, per-channel weights and symmetric activations from aa_deploy.calibration images, through
onnxruntime.quantization. The blurs stay exact: their nodes (and the Pad/Transpose glue around them)
are kept out of quantization, so their taps stay float and still sum to one. The graph therefore
runs fp32 blurs between quantized convolutions; a TensorRT build fuses them as it can.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx

from aa_deploy.common import inserted, model_io
from aa_deploy.common.atomic import refuse_overwrite
from aa_deploy.common.errors import InputError
from aa_deploy.common.images import Preprocess, load_folder, normalize
from aa_deploy.common.input_format import InputFormat
from aa_deploy.common.model_io import input_spec
from aa_deploy.common.progress import Progress, counter
from aa_deploy.converters.batching import fill, fixed_batch


class ImageReader:
    """onnxruntime.quantization.CalibrationDataReader over preprocessed images, in batches; with a
    `fixed` batch size every batch has exactly that many (the last filled up by repeating its last image,
    which leaves min/max ranges unchanged)."""

    def __init__(
        self,
        input_name: str,
        x: np.ndarray,
        batch: int = 32,
        fixed: int | None = None,
        progress: Progress | None = None,
    ) -> None:
        batch = fixed or batch
        parts = [x[i : i + batch] for i in range(0, len(x), batch)]
        self.batches = iter([{input_name: fill(p, fixed) if fixed else p} for p in parts])
        self.advance = counter(progress, "calibration batches", len(parts))

    def get_next(self):
        found = next(self.batches, None)
        if found is not None:
            self.advance(1)
        return found


def calibration_inputs(
    images: str | os.PathLike, preprocess: Preprocess, fmt: InputFormat = InputFormat(), limit: int | None = 500
) -> np.ndarray:
    """The calibration images as the model's input `fmt` takes them: the same notion of images as `calibrate` uses."""
    raw, _ = load_folder(images, preprocess, limit=limit)
    return normalize(raw, preprocess, fmt)


def blur_node_names(path: str | os.PathLike) -> list[str]:
    """Names of the nodes aa-deploy inserted (blur convs and their glue)."""
    model = model_io.load(path)
    return [n.name for n in model.graph if n.name and inserted.is_inserted(n)]


def _pre_process(model: Path, prepared: Path) -> str:
    """onnxruntime's quantization pre-processing (shape inference), falling back step by step where it
    fails (its symbolic shape inference gives up on LayerNorm nets and detector heads): returns what ran."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(model), str(prepared), skip_optimization=True)
        return "symbolic and ONNX shape inference"
    except Exception:  # noqa: BLE001 - onnxruntime raises TypeError, Exception("Incomplete ..."), ...
        pass
    try:
        quant_pre_process(str(model), str(prepared), skip_optimization=True, skip_symbolic_shape=True)
        return "ONNX shape inference (symbolic shape inference failed)"
    except Exception:  # noqa: BLE001
        onnx.save(onnx.load(str(model)), str(prepared))  # as it is, external weights taken along
        return "none (onnxruntime's shape inference failed on this graph)"


def quantize(
    model: str | os.PathLike,
    output: str | os.PathLike,
    x: np.ndarray,
    *,
    per_channel: bool = True,
    report: dict | None = None,
    reduce_range: bool = True,
    progress: Progress | None = None,
) -> list[str]:
    """Write a Q/DQ INT8 model calibrated on inputs `x`; returns the nodes kept in float (the blurs).
    `report`, if given, gets the shape inference that ran before quantizing (`pre_process`); `progress`
    receives `Advance("calibration batches", ...)` as ONNX Runtime reads them.

    `reduce_range` (default): weights on 7 bits. ONNX Runtime's fused int8 convolutions on x86 CPUs
    without VNNI (AVX2 only) add pairs of int8 products in int16, which saturate at full range; the
    Q/DQ graph itself is right, but the session that runs it is not (figures: docs/results.md, INT8)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model, output = Path(model), Path(output)
    refuse_overwrite(output, model)
    if not output.parent.is_dir():
        raise InputError(f"{output.parent}: output folder does not exist")
    keep_float = blur_node_names(model)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".aa-deploy-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        step = _pre_process(model, prepared)
        if report is not None:
            report["pre_process"] = step
        name, dims = input_spec(model)
        staged = Path(tmp) / output.name
        quantize_static(
            str(prepared),
            str(staged),
            ImageReader(name, x, fixed=fixed_batch(dims), progress=progress),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            reduce_range=reduce_range,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=keep_float,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        )
        onnx.checker.check_model(str(staged))
        os.replace(staged, output)
    return keep_float
