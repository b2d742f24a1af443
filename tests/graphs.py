"""Tiny ONNX graphs for unit tests (built with onnx.helper), and a NumPy blur reference.

The reference is written out here, independently of aa_deploy.conversion.filters: taps by hand, np.pad for
padding, explicit shifted sums for the correlation.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

TAPS = {"rect": [1, 1], "triangle": [1, 2, 1], "binomial": [1, 4, 6, 4, 1]}
NP_PAD = {"reflect": "reflect", "replicate": "edge", "zero": "constant"}


def np_blur(x: np.ndarray, axes, filt: str = "triangle", pad: str = "reflect", stride: int = 1) -> np.ndarray:
    """Blur `x` along `axes` with the named taps (or a list of taps), centred as (k-1)//2 left / k//2
    right, then subsample."""
    taps = np.asarray(TAPS[filt] if isinstance(filt, str) else filt, dtype=np.float64)
    taps /= taps.sum()
    k = len(taps)
    y = x.astype(np.float64)
    for axis in axes:
        widths = [(0, 0)] * y.ndim
        widths[axis] = ((k - 1) // 2, k // 2)
        padded = np.pad(y, widths, mode=NP_PAD[pad])
        n = y.shape[axis]
        y = sum(t * np.take(padded, range(j, j + n), axis=axis) for j, t in enumerate(taps))
        y = np.take(y, range(0, n, stride), axis=axis)
    return y.astype(np.float32)


def model(nodes, inputs, outputs, initializers=(), opset=17, name="g") -> onnx.ModelProto:
    g = helper.make_graph(nodes, name, inputs, outputs, initializer=list(initializers))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def inp(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def out(name: str, rank: int | None = None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, None if rank is None else [None] * rank)


def const(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def ints(name: str, values) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def conv_model(shape, c_out=4, kernel=(3, 3), strides=(2, 2), group=1, pads=None, bias=True, seed=0, **kw):
    """X -> Conv(strides) -> Y, the Conv reading the graph input directly."""
    rng = np.random.default_rng(seed)
    c_in = shape[1]
    w = rng.standard_normal((c_out, c_in // group, *kernel)).astype(np.float32)
    inits = [const("conv.w", w)]
    names = ["X", "conv.w"]
    if bias:
        inits.append(const("conv.b", rng.standard_normal(c_out).astype(np.float32)))
        names.append("conv.b")
    pads = pads if pads is not None else [k // 2 for k in kernel] * 2
    node = helper.make_node("Conv", names, ["Y"], name="stage/conv.0", strides=list(strides), group=group, pads=pads)
    return model([node], [inp("X", shape)], [out("Y", len(shape))], inits, **kw)


def run(m: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The first output of `m` on input X, in ONNX Runtime (CPU)."""
    import onnxruntime as ort

    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]


def convert(m: onnx.ModelProto, **options):
    """(converted ModelProto, Conversion) for in-memory `m`; the result must pass the full checker.
    The stem is blurred unless asked otherwise: in most graphs here the only site is a strided conv on
    the input, and what is tested is the rewrite (the default stem rule has its own tests)."""
    import onnx_ir as ir

    import aa_deploy

    options.setdefault("skip_stem", False)
    model = ir.serde.deserialize_model(m)
    result = aa_deploy.convert_model(model, aa_deploy.Options(**options))
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    return proto, result
