"""Blur nodes in ONNX: building the fixed depthwise blur (recognizing one is `common.inserted`).

A blur is a depthwise Conv (group = C, weight [C, 1, k...]) with constant, non-negative taps that
sum to one, the same in every channel. Reflect/replicate padding is a Pad node in front of it; zero
padding goes through the Conv's own `pads`. Channels-last tensors are transposed to channels-first
around it, since ONNX's Conv is channels-first.

Pooled form (wherever it applies and the blur carries no bias): a binomial row of m + 1 taps is the box
[1, 1] / 2 applied m times, and with reflect or replicate padding each box is an AveragePool of
kernel 2 with either no padding or one cell each side that the average leaves out
(count_include_pad=0; it then averages the edge cell with itself, which is replicating it):

    reflect,   m even:  (valid, pad-1) repeated m/2 times   (box2 of a reflect-padded row is the
                        replicate-padded box2 of the row; a triangle of reflect is triangle-reflect)
    replicate, m even:  pad-1 m/2 times, then valid m/2 times

The same numbers as Pad + Conv (up to float rounding), without the Pad: ONNX Runtime runs
AveragePool in its blocked NCHWc layout, where a Pad node costs a reorder out and back in (ResNet-50,
triangle, reflect, pre: latency ratio 1.07 -> 1.02 at batch 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from aa_deploy.common import graph
from aa_deploy.common.inserted import MARK
from aa_deploy.conversion import filters

ONNX_PAD_MODES = {"reflect": "reflect", "replicate": "edge", "zero": "constant"}


@dataclass(frozen=True)
class BlurSpec:
    """Everything that defines one blur of one tensor (equal specs on one tensor share a node)."""

    channels: int
    rank: int
    channel_axis: int
    axes: tuple[int, ...]  # axes of the tensor being blurred
    taps: tuple[tuple[float, ...], ...]  # per axis
    strides: tuple[int, ...]  # per axis
    pads: tuple[tuple[int, int], ...]  # per axis
    pad_mode: str  # reflect | replicate | zero
    guarded: bool = False  # reflect on maps of unknown size: choose reflect or edge at run time


def _box_powers(spec: BlurSpec) -> int | None:
    """m when every blurred axis has the binomial row of m + 1 taps (box [1, 1] / 2 applied m times)
    with m / 2 cells of padding each side, m even; else None."""
    m = len(spec.taps[0]) - 1
    row = filters.taps_1d(m + 1, 2)  # box [1, 1] / 2 applied m times
    ok = m >= 2 and m % 2 == 0
    ok = ok and all(len(t) == m + 1 and np.allclose(t, row, rtol=0, atol=1e-12) for t in spec.taps)
    return m if ok and all(p == (m // 2, m // 2) for p in spec.pads) else None


def pool_chain(spec: BlurSpec, dtype: np.dtype) -> list[bool] | None:
    """The pooled form of `spec` as one flag per AveragePool (True: pads one cell each side), or None
    where it does not apply (zero padding, the run-time padding guard, other taps, other ranks)."""
    if spec.pad_mode not in ("reflect", "replicate") or spec.guarded or not 3 <= spec.rank <= 5:
        return None
    if np.dtype(dtype) not in (np.float16, np.float32, np.float64):
        return None
    m = _box_powers(spec)
    if m is None:
        return None
    if spec.pad_mode == "reflect":
        return [False, True] * (m // 2)
    return [True] * (m // 2) + [False] * (m // 2)


def taps_of(blur: ir.Node, axes: tuple[int, ...]) -> list[np.ndarray]:
    """Per-axis 1-D taps of a blur (as `blur_after` returns it), for channels-first `axes`."""
    if blur.op_type == "Conv":
        weight = graph.const_array(blur.inputs[1])[0, 0]
        return [weight.sum(axis=tuple(j for j in range(weight.ndim) if j != a - 2)) for a in axes]
    m, node = 0, blur
    while graph.is_onnx(node, "AveragePool") and node.metadata_props.get(MARK):
        m += 1
        node = node.inputs[0].producer()
    kernel = graph.ints(blur, "kernel_shape")
    return [np.asarray(filters.taps_1d(m + 1, 2)) if kernel[a - 2] == 2 else np.ones(1) for a in axes]


class BlurBuilder:
    """Creates blur nodes in one graph with fresh, collision-free names."""

    def __init__(self, g: ir.Graph) -> None:
        self.graph = g
        self.names = {n.name for n in g.all_nodes() if n.name}
        self.names |= {v.name for n in g.all_nodes() for v in (*n.inputs, *n.outputs) if v is not None and v.name}
        self.names |= {v.name for v in (*g.inputs, *g.initializers.values()) if v.name}
        self.count = 0

    def _fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.names:
            i += 1
            name = f"{base}_{i}"
        self.names.add(name)
        return name

    def _const(self, base: str, array: np.ndarray) -> ir.Value:
        name = self._fresh(base)
        value = ir.Value(
            name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype))
        )
        value.const_value = ir.tensor(array, name=name)
        self.graph.register_initializer(value)
        return value

    def _guarded_reflect(self, nodes, x, pad_value, spec, first_axes, tag, dtype) -> ir.Value:
        """Pad reflect where every blurred axis is longer than its pad, else edge: the same run-time
        rule as the PyTorch twin (`plan.pad_mode_for`), for maps whose size is not known statically."""
        meta = {MARK: "1"}
        nodes.append(ir.node("Shape", [x], name=self._fresh(f"{tag}/shape"), metadata_props=meta))
        shape = nodes[-1].outputs[0]
        ok = None
        for a, (lo, hi) in zip(first_axes, spec.pads):
            index = self._const(f"{tag}/axis{a}", np.asarray([a], dtype=np.int64))
            limit = self._const(f"{tag}/limit{a}", np.asarray([max(lo, hi)], dtype=np.int64))
            nodes.append(
                ir.node("Gather", [shape, index], {"axis": 0}, name=self._fresh(f"{tag}/size{a}"), metadata_props=meta)
            )
            nodes.append(
                ir.node(
                    "Greater", [nodes[-1].outputs[0], limit], name=self._fresh(f"{tag}/fits{a}"), metadata_props=meta
                )
            )
            if ok is not None:
                nodes.append(
                    ir.node("And", [ok, nodes[-1].outputs[0]], name=self._fresh(f"{tag}/fits"), metadata_props=meta)
                )
            ok = nodes[-1].outputs[0]

        def branch(mode: str) -> ir.Graph:
            pad = ir.node(
                "Pad", [x, pad_value], {"mode": mode}, name=self._fresh(f"{tag}/pad_{mode}"), metadata_props=meta
            )
            out = pad.outputs[0]
            out.name = self._fresh(f"{x.name or tag}/pad_{mode}")
            out.type = ir.TensorType(ir.DataType.from_numpy(np.dtype(dtype)))
            return ir.Graph(inputs=(), outputs=(out,), nodes=(pad,), name=self._fresh(f"{tag}/{mode}"))

        nodes.append(
            ir.node(
                "If",
                [ok],
                {"then_branch": branch("reflect"), "else_branch": branch("edge")},
                name=self._fresh(f"{tag}/pad"),
                metadata_props=meta,
            )
        )
        return nodes[-1].outputs[0]

    def _pools(self, nodes: list, x: ir.Value, chain: list[bool], spec: BlurSpec, first_axes, tag: str) -> ir.Value:
        """The pooled form: AveragePools of kernel 2 on the blurred axes, the last one strided."""
        n = spec.rank - 2
        kernel, strides = [1] * n, [1] * n
        for a, s in zip(first_axes, spec.strides):
            kernel[a - 2], strides[a - 2] = 2, s
        for i, padded in enumerate(chain):
            last = i == len(chain) - 1
            attrs = {
                "kernel_shape": kernel,
                "strides": strides if last else [1] * n,
                "pads": [int(padded and k == 2) for k in kernel] * 2,
                "count_include_pad": 0,
            }
            nodes.append(
                ir.node("AveragePool", [x], attrs, name=self._fresh(f"{tag}/pool{i}"), metadata_props={MARK: "1"})
            )
            x = nodes[-1].outputs[0]
        return x

    def _conv(self, nodes: list, x: ir.Value, spec: BlurSpec, first_axes, tag: str, dtype, bias) -> ir.Value:
        """The depthwise Conv form, behind a Pad (or the padding guard) unless padding is zero."""
        r = spec.rank
        meta = {MARK: "1"}
        conv_pads = [0] * (2 * (r - 2))
        if any(p != (0, 0) for p in spec.pads):
            if spec.pad_mode == "zero":
                for a, (lo, hi) in zip(first_axes, spec.pads):
                    conv_pads[a - 2], conv_pads[a - 2 + r - 2] = lo, hi
            else:
                pads = [0] * (2 * r)
                for a, (lo, hi) in zip(first_axes, spec.pads):
                    pads[a], pads[a + r] = lo, hi
                pad_value = self._const(f"{tag}/pads", np.asarray(pads, dtype=np.int64))
                if spec.guarded:
                    x = self._guarded_reflect(nodes, x, pad_value, spec, first_axes, tag, dtype)
                else:
                    nodes.append(
                        ir.node(
                            "Pad",
                            [x, pad_value],
                            {"mode": ONNX_PAD_MODES[spec.pad_mode]},
                            name=self._fresh(f"{tag}/pad"),
                            metadata_props=meta,
                        )
                    )
                    x = nodes[-1].outputs[0]
        per_axis = [(1.0,)] * (r - 2)
        strides = [1] * (r - 2)
        for a, taps, s in zip(first_axes, spec.taps, spec.strides):
            per_axis[a - 2], strides[a - 2] = taps, s
        k = filters.kernel(per_axis, dtype=dtype)
        weight = self._const(f"{tag}/taps", np.broadcast_to(k, (spec.channels, 1, *k.shape)).copy())
        inputs = [x, weight] + ([bias] if bias is not None else [])
        nodes.append(
            ir.node(
                "Conv",
                inputs,
                {"group": spec.channels, "kernel_shape": list(k.shape), "strides": strides, "pads": conv_pads},
                name=self._fresh(f"{tag}/conv"),
                metadata_props=meta,
            )
        )
        return nodes[-1].outputs[0]

    def build(
        self, source: ir.Value, spec: BlurSpec, dtype: np.dtype, bias: ir.Value | None = None
    ) -> tuple[list[ir.Node], ir.Value]:
        """Nodes computing blur(source) (+ bias), not yet inserted, and the blurred value: the
        AveragePool form where it is exact and there is no bias (see the module doc), else the Conv."""
        self.count += 1
        tag = f"aa_blur{self.count}"
        meta = {MARK: "1"}
        nodes: list[ir.Node] = []
        r = spec.rank
        # Axis numbers in the channels-first view of the tensor.
        to_first = spec.channel_axis != 1
        first_axes = tuple(a + 1 for a in spec.axes) if to_first else spec.axes
        x = source
        if to_first:
            perm = [0, r - 1, *range(1, r - 1)]
            nodes.append(
                ir.node("Transpose", [x], {"perm": perm}, name=self._fresh(f"{tag}/to_nc"), metadata_props=meta)
            )
            x = nodes[-1].outputs[0]
        chain = pool_chain(spec, dtype) if bias is None else None
        if chain is not None:
            x = self._pools(nodes, x, chain, spec, first_axes, tag)
        else:
            x = self._conv(nodes, x, spec, first_axes, tag, dtype, bias)
        if to_first:
            perm = [0, *range(2, r), 1]
            nodes.append(
                ir.node("Transpose", [x], {"perm": perm}, name=self._fresh(f"{tag}/to_nhwc"), metadata_props=meta)
            )
            x = nodes[-1].outputs[0]
        for node in nodes:
            for out in node.outputs:
                out.name = self._fresh(f"{source.name or tag}/{node.name.rsplit('/', 1)[-1]}")
        return nodes, x
