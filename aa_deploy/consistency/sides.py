"""The models a consistency measurement runs, built as runners: ONNX files on ONNX Runtime (or TensorRT
engines), and the PyTorch original as the baseline where one is given. The one place `consistency`
touches a backend; `compare` measures whatever runners it is handed."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from aa_deploy.consistency.compare import Images, ImageSet, Measurement, compare
from aa_deploy.consistency.protocols import ConsistencyResult
from aa_deploy.converters.pytorch import TorchRunner
from aa_deploy.converters.runner import Runner
from aa_deploy.converters.runners import make_runner
from aa_deploy.converters.tensorrt import Sidecar
from aa_deploy.errors import InputError
from aa_deploy.input_format import InputFormat, from_dims
from aa_deploy.input_format import read as read_input_format
from aa_deploy.progress import Progress


@dataclass(frozen=True)
class Models:
    """What is measured: model files on one backend (onnxruntime with its `provider`, or tensorrt engines),
    after the PyTorch original (`reference`: (label, nn.Module), run on `device`) where one is given; the
    first model's image input `layout` where its graph cannot say."""

    paths: tuple[str | os.PathLike, ...]
    backend: str = "onnxruntime"
    provider: str = "cpu"
    reference: tuple[str, Any] | None = None
    device: str = "cpu"
    layout: str | None = None

    def __post_init__(self) -> None:
        if not self.paths:
            raise InputError("nothing to measure: give a model (and --compare models) besides --reference")

    def input_format(self) -> InputFormat:
        """The first model's image input: from the ONNX file, or from an engine's sidecar (its opt shape)."""
        first = self.paths[0]
        if self.backend == "tensorrt":
            shapes = Sidecar.read(first).shapes
            return from_dims(list(next(iter(shapes.values()))[1]), "float32", self.layout, str(first))
        return read_input_format(first, self.layout)

    def runners(self) -> dict[str, Runner]:
        """The runners by name, in order: the reference (fed the first model's layout) first where there is one."""
        runners: dict[str, Runner] = {}
        if self.reference is not None:
            layout = self.layout or self.input_format().layout
            runners[self.reference[0]] = TorchRunner(self.reference[1], self.device, layout or "NCHW")
        return runners | {str(m): make_runner(m, self.backend, self.provider) for m in self.paths}


def measure_models(
    models: Models,
    measurement: Measurement = Measurement(),
    images: Images = Images(),
    progress: Progress | None = None,
) -> tuple[dict[str, ConsistencyResult], ImageSet]:
    """`compare` on the runners `models` builds."""
    return compare(models.runners(), models.input_format(), measurement, images, progress)
