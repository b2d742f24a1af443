"""FP16 graphs: precision lives in the ONNX graph (TensorRT 11 has no FP16 builder flag).

onnxconverter-common converts weights and activations to float16 and keeps the model's inputs and
outputs float32. A blur whose taps are not exactly representable in float16 (widened filters such
as 1/3 or 1/9 taps at stride 3) stays float32, so every blur still sums to exactly one.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx

from aa_deploy import blur_nodes, graph, model_io
from aa_deploy.atomic import atomic_path
from aa_deploy.errors import InputError


def inexact_blurs(model_path: str | os.PathLike) -> list[str]:
    """Blur nodes whose taps change when rounded to float16."""
    model = model_io.load(model_path)
    out = []
    for node in model.graph:
        if node.op_type == "Conv" and blur_nodes.is_inserted(node):
            taps = graph.const_array(node.inputs[1])
            if taps is not None and not np.array_equal(taps.astype(np.float16).astype(taps.dtype), taps):
                out.append(node.name)
    return out


def to_fp16(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Write the float16 version of `src` to `dst`; returns the blur nodes kept in float32."""
    import warnings

    try:
        from onnxconverter_common import float16
    except ImportError:
        raise InputError("FP16 conversion needs onnxconverter-common (pip install onnxconverter-common)") from None
    src, dst = Path(src), Path(dst)
    keep = inexact_blurs(src)
    model = onnx.load(str(src))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # per-value notes about tiny weights flushed to fp16's range
        converted = float16.convert_float_to_float16(model, keep_io_types=True, node_block_list=keep)
    with atomic_path(dst) as tmp:
        onnx.save(converted, str(tmp))
        onnx.checker.check_model(str(tmp))
    return keep
