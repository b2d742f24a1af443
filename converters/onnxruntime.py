"""ONNX Runtime sessions behind the runner interface (`interface.Runner`)."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort

from aa_deploy.converters.batching import fixed_batch, run_in_batches
from aa_deploy.converters.interface import Runner

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def available_provider(provider: str) -> str:
    """ONNX Runtime's name for `provider` (cpu, cuda, tensorrt or a full name), if this install has it."""
    available = ort.get_available_providers()
    name = PROVIDERS.get(provider, provider)
    if name not in available:
        raise RuntimeError(f"ONNX Runtime provider {name} is not available here (have: {', '.join(available)})")
    return name


class OnnxRuntimeRunner(Runner):
    """One ONNX Runtime session; `run` maps input names to arrays and returns all outputs, for any number
    of samples also when the model's batch dimension is fixed (`fixed_batch`). Made active: the session
    is created here. `path`: the model file, or a ModelProto (a graph extended in memory, its weights
    inside it); `optimized` False: the graph as written, without fusions, so that every tensor is the one
    the graph names (what the bridge's check compares against)."""

    def __init__(
        self,
        path: str | os.PathLike | onnx.ModelProto,
        provider: str = "cpu",
        threads: int | None = None,
        optimized: bool = True,
    ) -> None:
        self.path, self.provider, self.threads, self.optimized = path, provider, threads, optimized
        self.activate()

    def _activate(self) -> None:
        name = available_provider(self.provider)
        options = ort.SessionOptions()
        if self.threads is not None:
            options.intra_op_num_threads = self.threads
        if not self.optimized:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            options.log_severity_level = 3
        source = self.path.SerializeToString() if isinstance(self.path, onnx.ModelProto) else str(self.path)
        self.session = ort.InferenceSession(source, options, providers=[name])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.fixed_batch = fixed_batch(self.session.get_inputs()[0].shape)

    def _release(self) -> None:
        del self.session

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self._active()
        return run_in_batches(lambda f: self.session.run(None, f), feeds, self.fixed_batch, lambda: self.output_names)
