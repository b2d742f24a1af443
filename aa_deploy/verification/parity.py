"""`verify`: numerical parity of an ONNX model on a backend against its PyTorch reference (plain or twin).

This module builds the two sides as runners (`converters.interface.Runner`): the deployed file on its
backend, and the PyTorch reference made the twin of the file's anti-aliasing; `comparator` runs and
compares them, knowing no backend. A parity check can fail; a `change` check (converted model against
the plain original) only reports how much the anti-aliasing moved the outputs.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aa_deploy.common import bundled, model_io
from aa_deploy.common.errors import InputError, SettingError
from aa_deploy.common.images import Preprocess, load_folder, normalize, preprocess_for
from aa_deploy.common.input_format import from_dims
from aa_deploy.conversion.plan import Options
from aa_deploy.converters.backends import make_runner
from aa_deploy.converters.export import load_model
from aa_deploy.converters.pytorch import TorchRunner
from aa_deploy.converters.tensorrt import Sidecar, require_tensorrt
from aa_deploy.twin.network import antialias_with
from aa_deploy.twin.weights import load_folded_weights
from aa_deploy.verification.comparator import Check, ParityResult, compare_runners


def random_inputs(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Deterministic standard-normal inputs (float32)."""
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def concrete_shape(dims: list, batch: int, input_shape: tuple[int, ...] | None) -> tuple[int, ...]:
    """A runnable input shape: `batch` for the first axis, `input_shape` (C, H, W...) where given or dynamic."""
    if input_shape is not None:
        if len(input_shape) != len(dims) - 1:
            raise InputError(
                f"--input-shape has {len(input_shape)} dims; the model's input has {len(dims) - 1} after the batch"
            )
        return (batch, *input_shape)
    rest = dims[1:]
    if any(not isinstance(d, int) or d <= 0 for d in rest):
        raise InputError(f"the model's input has dynamic dims {dims}: give --input-shape C x H x W")
    return (batch, *rest)


def reference_options(path: str | os.PathLike, reference: Reference) -> Options | None:
    """The anti-aliasing the reference needs: the user's, or the one recorded in the model's metadata."""
    antialiased = reference.antialiased
    if antialiased is False:
        return None
    if reference.options is not None:
        return reference.options
    meta = model_io.read_metadata(model_io.load_proto(path))
    if "options" in meta:
        return Options(**meta["options"])
    if antialiased:
        raise InputError(f"{path}: --antialiased needs filter options, and the model records none (not converted?)")
    return None


@dataclass(frozen=True)
class Inputs:
    """What both sides are fed: deterministic random inputs (no `images`), the bundled CIFAR-10 test
    images (`bundled:cifar10`) or an image folder read with `preprocess`; `count` of them (0: every image
    of the folder), the `seed` of random ones, `shape` (C x H x W...) where the model's dims are dynamic,
    and the image input's `layout` where the graph cannot say."""

    images: str | os.PathLike | None = None
    preprocess: Preprocess | None = None
    count: int = 8
    seed: int = 0
    shape: tuple[int, ...] | None = None
    layout: str | None = None

    def __post_init__(self) -> None:
        if self.count < 1 and not (self.count == 0 and self.images is not None):
            raise SettingError("count", "must be at least 1" + (" (0: every image)" if self.images else ""), self.count)


@dataclass(frozen=True)
class Reference:
    """The PyTorch side: `model` (an nn.Module, or a name: timm:..., torchvision:..., aa:...) with its
    `weights` where a name needs them; run as the twin with the anti-aliasing the deployed model records
    (`antialiased` None), with `options` instead, or plain (`antialiased` False)."""

    model: Any
    weights: str | os.PathLike | None = None
    antialiased: bool | None = None
    options: Options | None = None


@dataclass(frozen=True)
class Deployed:
    """The deployed side's backend: onnxruntime (with its execution `provider`) or tensorrt (an engine)."""

    backend: str = "onnxruntime"
    provider: str = "cpu"

    @property
    def label(self) -> str:
        return f"{self.backend}:{self.provider}" if self.backend == "onnxruntime" else self.backend


def make_inputs(model: str | os.PathLike, inputs: Inputs = Inputs()) -> tuple[np.ndarray, dict]:
    """The inputs of a check (fed as the model's input takes them: layout, channels, float type), and what
    the report says of them."""
    _, dims, dtype = model_io.input_spec(model, with_type=True)
    if inputs.images is None:
        shape = concrete_shape(dims, inputs.count, inputs.shape)
        info = {"source": "random normal", "seed": inputs.seed, "count": inputs.count, "shape": list(shape[1:])}
        return random_inputs(shape, inputs.seed), info
    fmt = from_dims(dims, dtype, inputs.layout, str(model))
    if inputs.images == bundled.CIFAR10:
        x = bundled.cifar_feed(fmt)(bundled.cifar_test_images()[0])
        return x, {"source": "bundled CIFAR-10 test images", "count": len(x), "shape": list(x.shape[1:])}
    preprocess = preprocess_for(fmt, inputs.preprocess, str(model))
    raw, _ = load_folder(inputs.images, preprocess, limit=inputs.count if inputs.count > 0 else None)
    x = normalize(raw, preprocess, fmt)
    if any(isinstance(d, int) and d > 0 and d != k for d, k in zip(dims[1:], x.shape[1:], strict=True)):
        raise InputError(f"preprocessed images are {list(x.shape[1:])}, the model takes {dims[1:]}: check --size")
    info = {
        "source": str(inputs.images),
        "count": len(x),
        "shape": list(x.shape[1:]),
        "preprocess": preprocess.as_dict(),
    }
    return x, info


def verify(
    model: str | os.PathLike,
    reference: Reference | Any,
    inputs: Inputs = Inputs(),
    check: Check = Check(),
    deployed: Deployed = Deployed(),
) -> ParityResult:
    """Check an ONNX model (or a TensorRT engine) on its backend against its PyTorch reference: build the
    two sides (`deployed_side`, `reference_side`), run both on the same inputs and compare (`comparator`).

    `reference`: a `Reference`, or just its model. Its twin carries the anti-aliasing recorded in the
    model's metadata, and a calibrated model's own weights. A `change` check compares with the *plain*
    reference and reports how much the anti-aliasing moved the outputs; it never fails."""
    reference = reference if isinstance(reference, Reference) else Reference(reference)
    path, graph_path = deployed_side(model, deployed)
    x, info = make_inputs(graph_path, inputs)
    runner, twin_options, placed = reference_side(reference, graph_path, x, check)
    if placed is not None:
        info = info | {"calibrated_weights": placed}
    with runner, make_runner(path, deployed.backend, deployed.provider) as deployed_runner:
        outputs = compare_runners(runner, deployed_runner, x, check)
    name = reference.model if isinstance(reference.model, str) else type(reference.model).__name__
    return ParityResult(
        kind=check.kind, passed=all(o.passed for o in outputs), model=str(path), reference=name,
        reference_antialiased=twin_options.as_dict() if twin_options else None, backend=deployed.label,
        precision=check.precision, tolerance=asdict(check.limits), inputs=info, outputs=outputs,
    )  # fmt: skip


def deployed_side(model: str | os.PathLike, deployed: Deployed) -> tuple[Path, Path]:
    """The deployed file, and the ONNX graph that describes it (an engine's: its source, from the sidecar)."""
    path = Path(model)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if deployed.backend != "tensorrt":
        return path, path
    require_tensorrt()
    return path, Sidecar.read(path).onnx_file(path)


def reference_side(reference: Reference, graph_path: Path, x: np.ndarray, check: Check):
    """The PyTorch side as a runner: the module (loaded by name where given one), made the twin of the
    deployed graph's anti-aliasing unless the check is a `change`, holding a calibrated graph's weights;
    with the twin's options and the weights placed (None: not calibrated)."""
    import torch

    module = reference.model
    if isinstance(module, str):
        module, _ = load_model(module, reference.weights)
    twin_options = None if check.kind == "change" else reference_options(graph_path, reference)
    placed = None
    if twin_options is not None:
        sample = torch.from_numpy(np.asarray(x[:1], np.float32))  # dense sampling reads levels from sizes
        module = antialias_with(module, twin_options, sample=sample)[0]
        graph_model = model_io.load(graph_path)
        if "calibration" in model_io.read_metadata(graph_model):
            # The file that ships is calibrated: its reference is the twin holding the calibrated weights,
            # read from the model itself (the BatchNorm-folded values go back into the twin's convs).
            placed = load_folded_weights(module, graph_model, torch.from_numpy(np.asarray(x[:2], np.float32)))
    return TorchRunner(module), twin_options, placed
