"""The bridge's execution of a graph checked against ONNX Runtime's on one batch, before anything trains on
it: a mismatch is a one-line error naming the first node whose output differs."""

from __future__ import annotations

import os

import numpy as np
import onnx
import torch

from aa_deploy.common.errors import InputError
from aa_deploy.converters.batching import fill
from aa_deploy.converters.bridge import OnnxModule
from aa_deploy.converters.onnxruntime import OnnxRuntimeRunner

TOLERANCE = 1e-4  # of the reference tensor's scale (its largest magnitude)


def _scaled_error(ours: np.ndarray, reference: np.ndarray) -> float:
    """max |ours - reference| over the reference's largest magnitude (inf for a shape mismatch or NaN)."""
    if ours.shape != reference.shape:
        return float("inf")
    reference = reference.astype(np.float64)
    error = np.abs(ours.astype(np.float64) - reference).max(initial=0.0)
    if not np.isfinite(error) and np.array_equal(np.isnan(ours), np.isnan(reference)):
        error = np.abs(np.nan_to_num(ours) - np.nan_to_num(reference)).max(initial=0.0)
    return float(error / max(np.abs(np.nan_to_num(reference)).max(initial=0.0), 1e-12))


def _as_written(model: onnx.ModelProto | str) -> OnnxRuntimeRunner:
    """A CPU runner of the graph as written: no fusions, so that every tensor is the one the graph names."""
    return OnnxRuntimeRunner(model, optimized=False)


def _first_difference(path: str | os.PathLike, module: OnnxModule, x: np.ndarray) -> str:
    """'node NAME (Op)' for the first node, in the bridge's order, whose float output differs from
    ONNX Runtime's by more than TOLERANCE of its scale; '' where it cannot be told (a model too large
    to hold twice, or every intermediate tensor agrees)."""
    try:
        proto = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    except Exception:  # noqa: BLE001 - over 2 GiB, or shape inference refuses: the output mismatch is still reported
        return ""
    typed = {v.name: v for v in proto.graph.value_info if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    listed = {o.name for o in proto.graph.output}
    names = [v.name for n in module.nodes if n.op_type not in ("Constant",) for v in n.outputs if v.name in typed]
    proto.graph.output.extend(typed[name] for name in names if name not in listed)
    try:
        with _as_written(proto) as runner:
            theirs = runner.infer({module.input_name: x})
    except Exception:  # noqa: BLE001 - ONNX Runtime refuses the extended graph: nothing more to tell
        return ""
    with torch.no_grad():
        _, ours = module(torch.from_numpy(x), capture={n for n in names if n in theirs})
    producer = {v.name: n for n in module.nodes for v in n.outputs}
    for name in names:
        if (
            name in theirs
            and name in ours
            and _scaled_error(ours[name].float().cpu().numpy(), theirs[name]) > TOLERANCE
        ):
            node = producer[name]
            return f"node {node.name or name} ({node.op_type})"
    return ""


SOFTMAX_ROUNDING = 0.01  # logits this far apart (absolute) move a softmax's probabilities by about 1 %


def _undecided_softmax(path: str | os.PathLike, module: OnnxModule, x: np.ndarray) -> float | None:
    """For an output that is a Softmax (or LogSoftmax) of logits that float32 cannot pin down: the
    logits' error, when they agree with ONNX Runtime's to TOLERANCE of their scale although their
    absolute differences (rounding) reach SOFTMAX_ROUNDING; else None.

    A softmax turns its input's absolute rounding into probability differences: logits of 1e9 (the
    synthetic weights of the ONNX Model Zoo's light models) are float32 numbers 100 apart, so two
    correct executions summing in different orders give different probabilities. There the logits are
    what can be compared. Logits that agree to within SOFTMAX_ROUNDING give matching probabilities, so
    an output mismatch then is the Softmax's own and stays an error."""
    producer = next((n for n in module.nodes for v in n.outputs if v.name == module.output_names[0]), None)
    if producer is None or producer.op_type not in ("Softmax", "LogSoftmax") or producer.inputs[0] is None:
        return None
    name = producer.inputs[0].name
    try:
        proto = onnx.load(str(path))
        proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
        with _as_written(proto) as runner:
            theirs = runner.infer({module.input_name: x})[name]
    except Exception:  # noqa: BLE001 - no logits to compare: the output's error stands
        return None
    with torch.no_grad():
        _, ours = module(torch.from_numpy(x), capture={name})
    ours = ours[name].float().cpu().numpy()
    error = _scaled_error(ours, theirs)
    if error > TOLERANCE or np.abs(ours.astype(np.float64) - theirs).max(initial=0.0) < SOFTMAX_ROUNDING:
        return None
    return error


def check_against_onnxruntime(path: str | os.PathLike, module: OnnxModule, x: np.ndarray) -> float:
    """The bridge's first output for `x` against ONNX Runtime's on the model at `path`; returns the error
    relative to the output's scale, or raises a one-line InputError naming the first node that differs
    when it exceeds TOLERANCE. ONNX Runtime runs the file as written (its own opset), unoptimized."""
    try:
        with _as_written(str(path)) as runner:
            batch = runner.fixed_batch
            x = fill(x[:batch], batch) if batch else x  # a graph exported for a fixed batch takes just that
            reference = runner.infer({module.input_name: x})[module.output_names[0]]
    except Exception as e:  # noqa: BLE001 - ONNX Runtime cannot run it: nothing to check against
        raise InputError(
            f"{path}: ONNX Runtime cannot run this model ({str(e).strip().splitlines()[0][:200]})"
        ) from None
    with torch.no_grad():
        ours = module(torch.from_numpy(x)).float().cpu().numpy()
    error = _scaled_error(ours, reference)
    if error <= TOLERANCE:
        return error
    logits = _undecided_softmax(path, module, x)
    if logits is not None:
        return logits
    where = _first_difference(path, module, x)
    detail = f"first at {where}" if where else f"at the output {module.output_names[0]}"
    shapes = "" if ours.shape == reference.shape else f"; shapes {list(ours.shape)} vs {list(reference.shape)}"
    raise InputError(
        f"{path}: calibration's PyTorch execution differs from ONNX Runtime's {detail} "
        f"({error:.2g} of the output scale, tolerance {TOLERANCE:g}{shapes}); this graph cannot be calibrated as it is"
    )
