"""Picking a runner for a deployed artifact: ONNX Runtime (CPU/CUDA/TensorRT providers) or TensorRT."""

from __future__ import annotations

import os

from aa_deploy.common.errors import InputError
from aa_deploy.converters.interface import Runner
from aa_deploy.converters.onnxruntime import OnnxRuntimeRunner
from aa_deploy.converters.tensorrt import TensorRTRunner

BACKENDS = ("onnxruntime", "tensorrt")


def make_runner(path: str | os.PathLike, backend: str = "onnxruntime", provider: str = "cpu") -> Runner:
    """The deployed artifact at `path` behind the runner interface."""
    if backend == "onnxruntime":
        try:
            return OnnxRuntimeRunner(path, provider)
        except Exception as e:  # noqa: BLE001 - ONNX Runtime raises its own types for unreadable models
            raise InputError(f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0]})") from None
    if backend == "tensorrt":
        return TensorRTRunner(path)
    raise InputError(f"unknown backend {backend!r} (choose {', '.join(BACKENDS)})")
