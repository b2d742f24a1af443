"""Picking a runner for a deployed artifact: ONNX Runtime (CPU/CUDA/TensorRT providers) or TensorRT."""

from __future__ import annotations

import os

from aa_deploy.errors import InputError

BACKENDS = ("onnxruntime", "tensorrt")


def make_runner(path: str | os.PathLike, backend: str = "onnxruntime", provider: str = "cpu"):
    """A runner with `run(feeds) -> outputs`, `input_names` and `output_names`."""
    if backend == "onnxruntime":
        from converters.onnxruntime import OnnxRuntimeRunner

        try:
            return OnnxRuntimeRunner(path, provider)
        except Exception as e:  # noqa: BLE001 - ONNX Runtime raises its own types for unreadable models
            raise InputError(f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0]})") from None
    if backend == "tensorrt":
        from converters.tensorrt import TensorRTRunner

        return TensorRTRunner(path)
    raise InputError(f"unknown backend {backend!r} (choose {', '.join(BACKENDS)})")
