"""The models a consistency measurement runs, built as runners: ONNX files on ONNX Runtime (or TensorRT
engines), and the PyTorch original as the baseline where one is given. The one place `consistency`
touches a backend; `compare` measures whatever runners it is handed."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from aa_deploy.common import model_io
from aa_deploy.common.errors import InputError
from aa_deploy.common.input_format import InputFormat, from_dims
from aa_deploy.common.input_format import read as read_input_format
from aa_deploy.common.progress import Progress
from aa_deploy.consistency.compare import Images, ImageSet, Measurement, compare
from aa_deploy.consistency.protocols import ConsistencyResult
from aa_deploy.conversion import cost
from aa_deploy.converters.backends import make_runner
from aa_deploy.converters.interface import Runner
from aa_deploy.converters.pytorch import TorchRunner
from aa_deploy.converters.pytorch import multiply_adds as torch_multiply_adds
from aa_deploy.converters.tensorrt import Sidecar
from aa_deploy.converters.timing import latency_ratio


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

    def costs(self, runners: dict[str, Runner], data: ImageSet, batch: int, latency: bool = True) -> dict:
        """Each model's multiply-adds (from its graph; the reference's counted by PyTorch) and, with `latency`,
        its latency against the baseline's at batch 1 and at `batch`, on the same real views."""
        views = data.prepare(data.views(max(1, min(batch, len(data.images)))))
        names = list(runners)
        out: dict[str, dict] = {}
        for name, runner in runners.items():
            if self.reference is not None and name == self.reference[0]:
                macs = torch_multiply_adds(self.reference[1], views[:1], runner)
            elif self.backend == "onnxruntime":
                macs = cost.multiply_adds(cost.with_shapes(cost.batch_of_one(model_io.load(name))))[0]
            else:
                macs = None  # an engine: no graph to count
            out[name] = {"multiply_adds": macs}
            if name != names[0] and latency:
                out[name]["latency"] = [
                    latency_ratio(runners[names[0]], runner, views[:b]) for b in sorted({1, len(views)})
                ]
        base = out[names[0]]["multiply_adds"]
        for entry in out.values():
            entry["multiply_adds_ratio"] = entry["multiply_adds"] / base if base and entry["multiply_adds"] else None
        return out


def measure_models(
    models: Models,
    measurement: Measurement = Measurement(),
    images: Images = Images(),
    progress: Progress | None = None,
) -> tuple[dict[str, ConsistencyResult], ImageSet]:
    """`compare` on the runners `models` builds."""
    return compare(models.runners(), models.input_format(), measurement, images, progress)
