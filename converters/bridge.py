"""ONNX <-> trainable PyTorch: run an ONNX graph with torch ops, train its weights, write them back.

`OnnxModule` executes the graph node by node. Float initializers read by Conv, Gemm/MatMul and
BatchNormalization become parameters named after the initializers, so writing trained weights back
changes initializer values only: same nodes, same names. Fixed blurs stay frozen and exact.
onnx2torch does not convert the opset-18 Pad that blurs and exporters emit, hence this mapping.
"""

from __future__ import annotations

import math
import operator
import os

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F
from torch import nn

from aa_deploy.common import graph, inserted, model_io
from aa_deploy.common.errors import InputError
from aa_deploy.converters.batching import fixed_batch

_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}
_TRAINABLE_INPUTS = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "InstanceNormalization": (1, 2),
    "Gemm": (1, 2),
    "MatMul": (1,),
    "BatchNormalization": (1, 2),
    "LayerNormalization": (1, 2),
}


def _div(a, b):
    """ONNX Div: integer tensors divide with truncation, as C does (shape arithmetic in exported graphs)."""
    if (
        isinstance(a, torch.Tensor)
        and isinstance(b, torch.Tensor)
        and not (a.is_floating_point() or b.is_floating_point())
    ):
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


# Ops that are one torch function of their inputs, without attributes.
_ELEMENTWISE = {
    "Abs": torch.abs, "Add": operator.add, "And": operator.and_, "Ceil": torch.ceil, "Div": _div,
    "Equal": operator.eq, "Erf": torch.erf, "Exp": torch.exp, "Floor": torch.floor, "Greater": operator.gt,
    "GreaterOrEqual": operator.ge, "HardSwish": F.hardswish, "Identity": lambda x: x, "Less": operator.lt,
    "LessOrEqual": operator.le, "Log": torch.log, "MatMul": operator.matmul, "Mish": F.mish, "Mul": operator.mul,
    "Neg": operator.neg, "Or": operator.or_, "Pow": torch.pow, "Reciprocal": torch.reciprocal, "Relu": F.relu,
    "Sigmoid": torch.sigmoid, "Softplus": F.softplus, "Sqrt": torch.sqrt, "Sub": operator.sub, "Tanh": torch.tanh,
}  # fmt: skip

_TORCH_DTYPES = {
    1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32, 7: torch.int64,
    9: torch.bool, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16,
}  # fmt: skip


def _key(name: str) -> str:
    return name.replace(".", "\x1f")  # ParameterDict keys may not contain dots


def _extreme(fn, empty: float, t: torch.Tensor, dims: tuple[int, ...], keepdim: bool) -> torch.Tensor:
    """ReduceMax / ReduceMin: over an empty set, ONNX gives -inf / +inf (the identity of the reduction)."""
    if all(t.shape[d] for d in dims):
        return fn(t, dim=dims, keepdim=keepdim)
    wanted = [1 if i in {d % t.dim() for d in dims} else n for i, n in enumerate(t.shape)]
    out = torch.full(wanted, empty, dtype=t.dtype, device=t.device)
    return out if keepdim else out.squeeze(tuple(d % t.dim() for d in dims))


def _ceil_extra(sizes, begins, ends, kernel, strides, dilations) -> list[int]:
    """Pixels to add at each axis' end so that a floor-mode pool gives ONNX's ceil_mode output: the
    last window may start in the input or its padding, never past them."""
    extra = []
    for size, b, e, k, st, d in zip(sizes, begins, ends, kernel, strides, dilations):
        span = d * (k - 1) + 1
        out = math.ceil((size + b + e - span) / st) + 1
        if (out - 1) * st >= size + b:
            out -= 1
        extra.append(max(0, (out - 1) * st + span - (size + b + e)))
    return extra


def _torch_pads(begins, ends) -> list[int]:
    return [p for b, e in zip(reversed(begins), reversed(ends)) for p in (b, e)]


def _downstream(nodes: list, names: set[str]) -> set[str]:
    """Names of the nodes named `names` and of every node that reads their outputs, directly or not."""
    reached: set[str] = set()
    tainted: set[int] = set()
    for node in nodes:
        if node.name in names or any(v is not None and id(v) in tainted for v in node.inputs):
            reached.add(node.name)
            tainted.update(id(v) for v in node.outputs)
    return reached


class OnnxModule(nn.Module):
    """A single-input ONNX graph as an nn.Module; `params` holds the trainable initializers."""

    channels_last = True  # a 4-D float input runs NHWC in memory (same values, faster CPU convolutions)

    def __init__(self, model: ir.Model) -> None:
        super().__init__()
        self.graph = model.graph
        self.nodes = list(model.graph)
        self.opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 21))
        self.blurpool_nodes = model_io.sites_where(model, "blurpool")
        # maps denser than the teacher's (--dense-last)
        self.dense_nodes = _downstream(self.nodes, model_io.sites_where(model, "dense"))
        self.params = nn.ParameterDict()
        self.consts: dict[str, torch.Tensor] = {}
        self.frozen: set[str] = set()
        self._take_constants(model)
        feeds = graph.data_inputs(model.graph)
        if len(feeds) != 1:
            raise InputError(
                f"calibration runs graphs of one input, and this one takes {len(feeds)}: "
                f"{', '.join(v.name for v in feeds)}"
            )
        self.input_name = feeds[0].name
        # A graph exported with a fixed batch (Reshape to [1, 2048] and the like) runs per batch of that
        # size under torch.func.vmap: any number of samples, batched kernels, gradients as usual.
        self.fixed_batch = fixed_batch(feeds[0].shape)
        self.output_names = [v.name for v in model.graph.outputs]
        # every tensor a node produces -> that node's position (the graph input: -1)
        self.producers = {v.name: i for i, n in enumerate(self.nodes) for v in n.outputs}
        self.producers[self.input_name] = -1
        self.computed = set(self.producers) - {self.input_name}
        self.hooks: dict[str, callable] = {}  # tensor name -> fn(tensor) -> tensor (probes)
        # Each tensor is dropped from the environment after its last reader (not when subgraphs read the
        # outer scope by name): without gradients, peak memory is then the live activations only.
        self._last_use: dict[str, int] = {}
        if not any(n.op_type in ("If", "Loop", "Scan") for n in self.nodes):
            for i, node in enumerate(self.nodes):
                for v in node.inputs:
                    if v is not None:
                        self._last_use[v.name] = i
            for name in self.output_names:
                self._last_use.pop(name, None)
        unsupported = sorted(
            {
                n.op_type
                for n in model.graph.all_nodes()
                if n.op_type not in _ELEMENTWISE and not hasattr(self, f"_op_{n.op_type}")
            }
        )
        if unsupported:
            raise InputError(f"calibration cannot run these ops in PyTorch yet: {', '.join(unsupported)}")

    def _take_constants(self, model: ir.Model) -> None:
        """Every constant input as a tensor: the weights and biases of trainable ops as parameters (a blur's
        taps frozen), the rest as constants."""
        for node in model.graph.all_nodes():  # subgraphs too: the padding guard's branches read constants
            blur = inserted.is_inserted(node)
            for i, value in enumerate(node.inputs):
                if value is None or value.name in self.consts or _key(value.name) in self.params:
                    continue
                array = graph.const_array(value)
                if array is None:
                    continue
                tensor = torch.from_numpy(np.array(array))
                if (
                    i in _TRAINABLE_INPUTS.get(node.op_type, ())
                    and tensor.is_floating_point()
                    and value.producer() is None
                ):
                    fixed = blur and i == 1  # the taps; a blurpool blur's bias is the conv's own, and trains
                    self.params[_key(value.name)] = nn.Parameter(tensor.float(), requires_grad=not fixed)
                    if fixed:
                        self.frozen.add(value.name)
                else:
                    self.consts[value.name] = tensor

    def _apply(self, fn, recurse=True):  # .to(device) and friends move the constants too
        self.consts = {k: fn(v) for k, v in self.consts.items()}
        return super()._apply(fn, recurse)

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device if len(self.params) else torch.device("cpu")

    @torch.no_grad()
    def activation_bytes(self, x: torch.Tensor) -> int:
        """Bytes of every tensor one sample of `x` produces in a forward pass (what training keeps)."""
        total = 0

        def count(t):
            nonlocal total
            total += t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0
            return t

        saved, self.hooks = self.hooks, dict.fromkeys(self.computed, count) | self.hooks
        try:
            self._forward(x[:1].to(self.device).expand(self.fixed_batch or 1, *x.shape[1:]))
        finally:
            self.hooks = saved
        return total // (self.fixed_batch or 1)

    def trainable(self) -> dict[str, nn.Parameter]:
        """Initializer name -> parameter, for the weights calibration may change."""
        return {k.replace("\x1f", "."): p for k, p in self.params.items() if p.requires_grad}

    def _get(self, env: dict, value: ir.Value | None):
        if value is None or value.name == "":
            return None
        if value.name in env:
            return env[value.name]
        key = _key(value.name)
        if key in self.params:
            return self.params[key]
        return self.consts[value.name]

    def forward(self, x: torch.Tensor, capture: set[str] | None = None) -> torch.Tensor | tuple:
        """The first output for input `x` (moved to the module's device); with `capture`, also the named
        tensors, and the pass stops as soon as they are all computed (the output is then None)."""
        x = x.to(self.device)
        b = self.fixed_batch
        if b is None or x.shape[0] == b:
            return self._forward(self.laid_out(x), capture)
        n = x.shape[0]
        if n % b:
            x = torch.cat([x, x[-1:].expand(b - n % b, *x.shape[1:])])
        chunks = x.reshape(-1, b, *x.shape[1:])
        if capture is not None:  # vmap returns tensors only: the captured ones (the pass may stop early)
            captured = torch.func.vmap(lambda chunk: self._forward(chunk, capture)[1])(chunks)
            return None, torch.utils._pytree.tree_map(lambda t: t.reshape(-1, *t.shape[2:])[:n], captured)
        out = torch.func.vmap(lambda chunk: self._forward(chunk, capture))(chunks)
        return torch.utils._pytree.tree_map(lambda t: t.reshape(-1, *t.shape[2:])[:n], out)

    def laid_out(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the pass runs it: a 4-D float tensor NHWC in memory (same values), where PyTorch's
        CPU convolutions, depthwise above all, run faster and every op downstream keeps the layout
        (benchmarks/distill_throughput.py). Every pass starts here, so that all agree bit for bit."""
        if self.channels_last and x.dim() == 4 and x.is_floating_point():
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def _run(self, node: ir.Node, env: dict):
        args = [self._get(env, v) for v in node.inputs]
        if node.op_type in _ELEMENTWISE:
            return _ELEMENTWISE[node.op_type](*args)
        return getattr(self, f"_op_{node.op_type}")(node, *args)

    @property
    def streams(self) -> bool:
        """Whether a pass can be held part way and resumed (`run_nodes`): not for a fixed-batch graph
        (run under vmap) nor one with control flow (whose tensors are never released)."""
        return self.fixed_batch is None and bool(self._last_use)

    def run_nodes(
        self, env: dict, start: int, stop: int, capture: set[str] | None = None, captured: dict | None = None
    ) -> int:
        """Run nodes [start, stop) on the live tensors `env` in place, releasing each after its last reader;
        named tensors of `capture` go into `captured` as they are computed, and the run ends once all are
        there. Returns the index of the next node to run."""
        self._scope = env  # outer scope for subgraphs (If)
        for i in range(start, stop):
            node = self.nodes[i]
            out = self._run(node, env)
            outs = out if isinstance(out, tuple) else (out,)
            for value, tensor in zip(node.outputs, outs):
                if value.name in self.hooks:
                    tensor = self.hooks[value.name](tensor)
                env[value.name] = tensor
                if capture and value.name in capture:
                    captured[value.name] = tensor
            for v in node.inputs:
                if v is not None and self._last_use.get(v.name) == i:
                    env.pop(v.name, None)
            if capture and len(captured) == len(capture):
                return i + 1
        return max(start, stop)

    def _forward(self, x: torch.Tensor, capture: set[str] | None = None) -> torch.Tensor | tuple:
        env, captured = {self.input_name: x}, {}
        self.run_nodes(env, 0, len(self.nodes), capture, captured)
        if capture and len(captured) == len(capture):
            return None, captured
        outputs = env[self.output_names[0]]
        return (outputs, captured) if capture is not None else outputs

    # -- ops: what exported CNNs and aa-deploy's blurs use ------------------------------------------
    def _op_Conv(self, node, x, w, b=None):
        n = w.dim() - 2
        strides = graph.ints(node, "strides", [1] * n)
        dilations = graph.ints(node, "dilations", [1] * n)
        pads = graph.explicit_pads(node, x.shape[2:], w.shape[2:])
        if pads[:n] != pads[n:]:
            x = F.pad(x, _torch_pads(pads[:n], pads[n:]))
            pads = [0] * (2 * n)
        conv = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
        return conv(x, w, b, strides, pads[:n], dilations, node.attributes.get_int("group", 1))

    def _op_Gemm(self, node, a, b, c=None):
        if node.attributes.get_int("transA", 0):
            a = a.t()
        if node.attributes.get_int("transB", 0):
            b = b.t()
        y = node.attributes.get_float("alpha", 1.0) * (a @ b)
        return y if c is None else y + node.attributes.get_float("beta", 1.0) * c

    def _op_BatchNormalization(self, node, x, scale, bias, mean, var):
        if node.attributes.get_int("training_mode", 0):
            raise InputError(f"{node.name}: BatchNormalization in training mode is not supported by calibration")
        return F.batch_norm(x, mean, var, scale, bias, False, 0.0, node.attributes.get_float("epsilon", 1e-5))

    def _op_HardSigmoid(self, node, x):
        return torch.clamp(node.attributes.get_float("alpha", 0.2) * x + node.attributes.get_float("beta", 0.5), 0, 1)

    def _op_Clip(self, node, x, lo=None, hi=None):
        if lo is None and "min" in node.attributes:  # opset < 11: the bounds are attributes
            lo = node.attributes.get_float("min")
        if hi is None and "max" in node.attributes:
            hi = node.attributes.get_float("max")
        if lo is None and hi is None:
            return x
        return torch.clamp(x, None if lo is None else float(lo), None if hi is None else float(hi))

    def _op_Constant(self, node):
        return torch.from_numpy(np.array(graph.const_array(node.outputs[0])))

    def _op_Pad(self, node, x, pads, value=None, axes=None):
        pads = [int(p) for p in pads]
        r = x.dim()
        if axes is not None:
            full = [0] * (2 * r)
            for i, a in enumerate(int(a) % r for a in axes):
                full[a], full[a + r] = pads[i], pads[i + len(axes)]
            pads = full
        flat = [p for i in reversed(range(r)) for p in (pads[i], pads[i + r])]
        while len(flat) > 2 and flat[-2:] == [0, 0]:
            flat = flat[:-2]  # torch pads trailing dims only; leading zero pads are dropped
        mode = _PAD_MODES[node.attributes.get_string("mode", "constant")]
        fill = 0.0 if value is None or value.numel() == 0 else float(value)
        return F.pad(x, flat, mode=mode, value=fill) if mode == "constant" else F.pad(x, flat, mode=mode)

    def _op_Slice(self, node, x, starts, ends, axes=None, steps=None):
        index = [slice(None)] * x.dim()
        axes = range(len(starts)) if axes is None else axes
        steps = [1] * len(starts) if steps is None else steps
        backwards = []
        for s, e, a, st in zip(starts, ends, axes, steps):
            a, s, e, st = int(a) % x.dim(), int(s), int(e), int(st)
            size = x.shape[a]
            s, e = s + size if s < 0 else s, e + size if e < 0 else e
            if st > 0:
                index[a] = slice(max(0, min(size, s)), max(0, min(size, e)), st)
            else:  # ONNX clamps a backward slice to [-1, size - 1] (TorchScript reverses pad lists so)
                backwards.append((a, torch.arange(max(-1, min(size - 1, s)), max(-1, min(size - 1, e)), st)))
        x = x[tuple(index)]
        for a, idx in backwards:
            x = x.index_select(a, idx.to(x.device))
        return x

    def _op_Concat(self, node, *xs):
        return torch.cat(xs, dim=node.attributes.get_int("axis", 0))

    def _op_Reshape(self, node, x, shape):
        shape = [int(d) for d in shape]
        if not node.attributes.get_int("allowzero", 0):
            shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
        return x.reshape(shape)

    def _op_Flatten(self, node, x):
        axis = node.attributes.get_int("axis", 1)
        axis = axis + x.dim() if axis < 0 else axis
        return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))

    def _op_Transpose(self, node, x):
        return x.permute(*graph.ints(node, "perm", reversed(range(x.dim()))))

    def _op_MaxPool(self, node, x):
        indices = node.outputs[1] if len(node.outputs) > 1 else None
        if indices is not None and (indices.consumers() or indices.is_graph_output()):
            raise InputError(f"{node.name}: MaxPool's indices output is not supported by calibration")
        return self._pool(node, x, average=False)

    def _op_AveragePool(self, node, x):
        return self._pool(node, x, average=True)

    def _pool(self, node, x, average: bool):
        """ONNX MaxPool / AveragePool: torch's own pools where they mean the same (symmetric pads of at
        most half the window, no dilation for averages), else the pads made explicit (asymmetric,
        auto_pad, ceil_mode) and averages as a sum over a count, dilations included."""
        k = graph.ints(node, "kernel_shape")
        n = len(k)
        strides, dilations = graph.ints(node, "strides", [1] * n), graph.ints(node, "dilations", [1] * n)
        sizes = x.shape[2:]
        pads = graph.explicit_pads(node, sizes, k)
        begins, ends = pads[:n], pads[n:]
        ceil = bool(node.attributes.get_int("ceil_mode", 0))
        include = bool(node.attributes.get_int("count_include_pad", 0))
        half = all(b == e and 2 * b <= d * (kk - 1) + 1 for b, e, kk, d in zip(begins, ends, k, dilations))
        if half and not (average and any(d != 1 for d in dilations)):
            if average:
                fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[n - 1]
                return fn(x, k, strides, begins, ceil, include)
            fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[n - 1]
            return fn(x, k, strides, begins, dilations, ceil)
        extra = _ceil_extra(sizes, begins, ends, k, strides, dilations) if ceil else [0] * n
        padded = _torch_pads(begins, [e + x_ for e, x_ in zip(ends, extra)])
        if not average:
            fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[n - 1]
            return fn(F.pad(x, padded, value=-math.inf), k, strides, 0, dilations)
        conv = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
        c = x.shape[1]
        window = torch.ones((c, 1, *k), dtype=x.dtype, device=x.device)
        sums = conv(F.pad(x, padded), window, stride=strides, dilation=dilations, groups=c)
        mask = torch.ones((1, 1, *sizes), dtype=x.dtype, device=x.device)
        mask = F.pad(mask, _torch_pads(begins, ends), value=float(include))
        mask = F.pad(mask, _torch_pads([0] * n, extra))
        counts = conv(mask, window[:1], stride=strides, dilation=dilations)
        return sums / counts

    def _op_GlobalAveragePool(self, node, x):
        return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)

    def _reduce(self, node, x, axes, fn):
        """ONNX reductions: axes as attribute (opset < 18) or input; none given means all axes."""
        axes = graph.ints(node, "axes") if axes is None else [int(a) for a in axes.reshape(-1)]
        if not axes and node.attributes.get_int("noop_with_empty_axes", 0):
            return x
        dims = tuple(axes) if axes else tuple(range(x.dim()))
        return fn(x, dims, bool(node.attributes.get_int("keepdims", 1)))

    def _op_ReduceMean(self, node, x, axes=None):
        return self._reduce(node, x, axes, lambda t, d, k: t.mean(dim=d, keepdim=k))

    def _op_ReduceSum(self, node, x, axes=None):
        return self._reduce(node, x, axes, lambda t, d, k: t.sum(dim=d, keepdim=k))

    def _op_ReduceL2(self, node, x, axes=None):
        return self._reduce(node, x, axes, lambda t, d, k: torch.sqrt((t * t).sum(dim=d, keepdim=k)))

    def _op_Squeeze(self, node, x, axes=None):
        axes = graph.ints(node, "axes") if axes is None else [int(a) for a in axes.reshape(-1)]
        return x.squeeze(tuple(axes)) if axes else x.squeeze()

    def _op_Unsqueeze(self, node, x, axes=None):
        axes = graph.ints(node, "axes") if axes is None else [int(a) for a in axes.reshape(-1)]
        for a in sorted(a % (x.dim() + len(axes)) for a in axes):
            x = x.unsqueeze(a)
        return x

    def _op_Shape(self, node, x):
        start, end = node.attributes.get_int("start", 0), node.attributes.get("end")
        dims = list(x.shape)
        return torch.tensor(dims[start : None if end is None else end.as_int()], dtype=torch.int64)

    def _op_Gather(self, node, data, indices):
        axis = node.attributes.get_int("axis", 0) % data.dim()
        out = torch.index_select(data, axis, indices.reshape(-1).long() % data.shape[axis])
        return out.reshape(data.shape[:axis] + indices.shape + data.shape[axis + 1 :])

    def _op_If(self, node, cond, *_):
        """The chosen branch's nodes run in a scope that sees the enclosing one (a branch reads outer values
        by name; aa-deploy's guarded reflect padding is one); its outputs are the node's."""
        branch = node.attributes["then_branch" if bool(cond.reshape(-1)[0]) else "else_branch"].as_graph()
        outer = self._scope
        env = dict(outer)
        self._scope = env  # the scope of an If inside this branch
        try:
            for inner in branch:
                out = self._run(inner, env)
                for value, tensor in zip(inner.outputs, out if isinstance(out, tuple) else (out,)):
                    env[value.name] = tensor
        finally:
            self._scope = outer
        outs = tuple(self._get(env, v) for v in branch.outputs)
        return outs if len(outs) > 1 else outs[0]

    def _op_Softmax(self, node, x):
        if self.opset >= 13:
            return F.softmax(x, dim=node.attributes.get_int("axis", -1))
        # opset < 13: over everything from `axis` (default 1) on, the input flattened to 2-D there
        axis = node.attributes.get_int("axis", 1)
        axis = axis + x.dim() if axis < 0 else axis
        return F.softmax(x.reshape(*x.shape[:axis], -1), dim=-1).reshape(x.shape)

    def _op_LayerNormalization(self, node, x, scale, bias=None):
        if any(v is not None and (v.consumers() or v.is_graph_output()) for v in node.outputs[1:]):
            raise InputError(
                f"{node.name}: LayerNormalization's Mean / InvStdDev outputs are not supported by calibration"
            )
        axis = node.attributes.get_int("axis", -1) % x.dim()
        eps = node.attributes.get_float("epsilon", 1e-5)
        if scale.dim() == x.dim() - axis:
            return F.layer_norm(x, tuple(x.shape[axis:]), scale, bias, eps)
        mean = x.mean(dim=tuple(range(axis, x.dim())), keepdim=True)
        var = ((x - mean) ** 2).mean(dim=tuple(range(axis, x.dim())), keepdim=True)
        y = (x - mean) / torch.sqrt(var + eps) * scale
        return y if bias is None else y + bias

    def _op_Gelu(self, node, x):
        return F.gelu(x, approximate=node.attributes.get_string("approximate", "none"))

    # -- shape arithmetic (TorchScript exports compute paddings and reshapes at run time) -----------
    def _op_Cast(self, node, x):
        return x.to(_TORCH_DTYPES[node.attributes.get_int("to")])

    def _op_CastLike(self, node, x, like):
        return x.to(like.dtype)

    def _op_ConstantOfShape(self, node, shape):
        value = node.attributes.get("value")
        fill = torch.from_numpy(np.array(value.as_tensor().numpy())).reshape(-1) if value else torch.zeros(1)
        return fill.expand(*[int(d) for d in shape]).clone() if len(shape) else fill.reshape(()).clone()

    def _op_Range(self, node, start, limit, delta):
        return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)

    def _op_Expand(self, node, x, shape):
        shape = [int(d) for d in shape]
        rank = max(x.dim(), len(shape))
        dims = [1] * (rank - x.dim()) + list(x.shape)
        target = [1] * (rank - len(shape)) + shape
        return x.reshape(dims).expand([max(a, b) if 1 in (a, b) else b for a, b in zip(dims, target)])

    def _op_Tile(self, node, x, repeats):
        return x.repeat(*[int(r) for r in repeats])

    def _op_Size(self, node, x):
        return torch.tensor(x.numel(), dtype=torch.int64)

    def _op_Where(self, node, cond, a, b):
        return torch.where(cond.bool(), a, b)

    def _op_Not(self, node, x):
        return ~x.bool()

    def _op_Split(self, node, x, split=None):
        axis = node.attributes.get_int("axis", 0)
        sizes = graph.ints(node, "split") if split is None else [int(v) for v in split]
        if not sizes:
            n = node.attributes.get_int("num_outputs", len(node.outputs))
            sizes = [-(-x.shape[axis] // n)] * (n - 1)
            sizes.append(x.shape[axis] - sum(sizes))
        return tuple(torch.split(x, sizes, dim=axis))

    def _op_GatherElements(self, node, data, indices):
        axis = node.attributes.get_int("axis", 0) % data.dim()
        return torch.gather(data, axis, indices.long() % data.shape[axis])

    def _op_GatherND(self, node, data, indices):
        b = node.attributes.get_int("batch_dims", 0)
        if b:
            raise InputError(f"{node.name}: GatherND with batch_dims is not supported by calibration")
        idx = indices.long()
        return data[tuple(idx[..., k] for k in range(idx.shape[-1]))]

    def _op_ScatterND(self, node, data, indices, updates):
        reduction = node.attributes.get_string("reduction", "none")
        if reduction not in ("none", "add"):
            raise InputError(f"{node.name}: ScatterND reduction {reduction} is not supported by calibration")
        idx = indices.long()
        return data.index_put(tuple(idx[..., k] for k in range(idx.shape[-1])), updates, accumulate=reduction == "add")

    # -- elementwise -------------------------------------------------------------------------------
    def _op_Mod(self, node, a, b):
        return torch.fmod(a, b) if node.attributes.get_int("fmod", 0) else torch.remainder(a, b)

    def _op_Sum(self, node, *xs):
        return sum(xs[1:], xs[0])

    def _op_Mean(self, node, *xs):
        return sum(xs[1:], xs[0]) / len(xs)

    def _op_Max(self, node, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = torch.maximum(out, x)
        return out

    def _op_Min(self, node, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = torch.minimum(out, x)
        return out

    def _op_LeakyRelu(self, node, x):
        return F.leaky_relu(x, node.attributes.get_float("alpha", 0.01))

    def _op_Elu(self, node, x):
        return F.elu(x, node.attributes.get_float("alpha", 1.0))

    def _op_PRelu(self, node, x, slope):
        return torch.where(x >= 0, x, x * slope)

    def _op_Dropout(self, node, x, *_):
        return (x, torch.ones_like(x, dtype=torch.bool)) if len(node.outputs) > 1 else x

    # -- layers ------------------------------------------------------------------------------------
    def _op_ConvTranspose(self, node, x, w, b=None):
        """The full transposed convolution, then each spatial axis cut to ONNX's output: explicit `pads`
        (begin, end) and `output_padding`, or the padding `output_shape` / `auto_pad` imply (ONNX's formula:
        SAME_UPPER puts the odd pixel at the end, the others at the start); positions outside the full
        result hold only the bias."""
        n = w.dim() - 2
        strides = graph.ints(node, "strides", [1] * n)
        dilations = graph.ints(node, "dilations", [1] * n)
        extra = graph.ints(node, "output_padding", [0] * n)
        conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[n - 1]
        full = conv(x, w, None, strides, 0, 0, node.attributes.get_int("group", 1), dilations)
        sizes = full.shape[2:]
        auto = node.attributes.get_string("auto_pad", "NOTSET") or "NOTSET"
        wanted = graph.ints(node, "output_shape") or None
        if wanted is None and auto in ("SAME_UPPER", "SAME_LOWER"):
            wanted = [d * s for d, s in zip(x.shape[2:], strides)]
        if wanted is not None:
            wanted = wanted[-n:]
            total = [size + e - want for size, e, want in zip(sizes, extra, wanted)]
            upper = auto == "SAME_UPPER"
            begins = [t // 2 if upper else t - t // 2 for t in total]
        elif auto == "VALID":
            begins, wanted = [0] * n, [size + e for size, e in zip(sizes, extra)]
        else:
            pads = graph.ints(node, "pads", [0] * (2 * n))
            begins, wanted = pads[:n], [size + e - a - z for size, e, a, z in zip(sizes, extra, pads[:n], pads[n:])]
        for axis, (begin, length) in enumerate(zip(begins, wanted), start=2):
            size = full.shape[axis]
            before, after = max(0, -begin), max(0, begin + length - size)
            if before or after:
                pad = [0, 0] * (full.dim() - axis - 1) + [before, after]
                full = F.pad(full, pad)
            full = full.narrow(axis, begin + before, length)
        return full if b is None else full + b.reshape(1, -1, *[1] * n)

    def _op_LRN(self, node, x):
        return F.local_response_norm(
            x,
            node.attributes.get_int("size"),
            node.attributes.get_float("alpha", 1e-4),
            node.attributes.get_float("beta", 0.75),
            node.attributes.get_float("bias", 1.0),
        )

    def _op_InstanceNormalization(self, node, x, scale, bias):
        return F.instance_norm(x, weight=scale, bias=bias, eps=node.attributes.get_float("epsilon", 1e-5))

    def _op_GlobalMaxPool(self, node, x):
        return torch.amax(x, dim=tuple(range(2, x.dim())), keepdim=True)

    def _op_ReduceMax(self, node, x, axes=None):
        return self._reduce(node, x, axes, lambda t, d, k: _extreme(torch.amax, -math.inf, t, d, k))

    def _op_ReduceMin(self, node, x, axes=None):
        return self._reduce(node, x, axes, lambda t, d, k: _extreme(torch.amin, math.inf, t, d, k))

    def _op_Einsum(self, node, *xs):
        return torch.einsum(node.attributes.get_string("equation"), *xs)

    def _op_Resize(self, node, x, roi=None, scales=None, sizes=None):
        mode = node.attributes.get_string("mode", "nearest")
        coords = node.attributes.get_string("coordinate_transformation_mode", "half_pixel")
        nearest = node.attributes.get_string("nearest_mode", "round_prefer_floor")
        spatial = list(range(2, x.dim()))
        axes = [a % x.dim() for a in graph.ints(node, "axes", spatial)]
        given = sizes if sizes is not None and sizes.numel() else scales
        values = [float(v) for v in given]
        if len(values) == x.dim():
            values = [values[a] for a in axes]
        by_axis = dict(zip(axes, values))
        unchanged = all(
            by_axis.get(a, 1.0 if given is scales else x.shape[a]) == (1.0 if given is scales else x.shape[a])
            for a in (0, 1)
        )
        antialias = bool(node.attributes.get_int("antialias", 0))
        plain_cubic = node.attributes.get_float("cubic_coeff_a", -0.75) == -0.75 and not node.attributes.get_int(
            "exclude_outside", 0
        )
        if given is scales and coords != "align_corners":  # align_corners maps by the sizes alone
            factors = [by_axis.get(a, 1.0) for a in spatial]
            size = [int(math.floor(d * f)) for d, f in zip(x.shape[2:], factors)]
            interpolate = {"scale_factor": factors, "recompute_scale_factor": False}
        else:
            size = [
                int(by_axis[a])
                if given is not scales
                else int(math.floor(x.shape[a] * by_axis[a]))
                if a in by_axis
                else x.shape[a]
                for a in spatial
            ]
            interpolate = {"size": size}
        if unchanged and mode == "nearest" and coords == "asymmetric" and nearest == "floor" and not antialias:
            return F.interpolate(x, mode="nearest", **interpolate)
        # align_corners maps by (in - 1) / (in x scale - 1): torch's by the sizes, the same when in x scale is whole
        whole = given is not scales or all(float(x.shape[a] * f).is_integer() for a, f in by_axis.items())
        supported_coords = (
            ("half_pixel",) + (("align_corners",) if whole else ()) + (("pytorch_half_pixel",) if min(size) > 1 else ())
        )
        if (
            unchanged
            and mode in ("linear", "cubic")
            and coords in supported_coords
            and (mode == "linear" or plain_cubic)
        ):
            kind = {"linear": ("linear", "bilinear", "trilinear"), "cubic": (None, "bicubic", None)}[mode][x.dim() - 3]
            if kind is not None and not antialias:  # torch's antialias filter is not ONNX's
                return F.interpolate(x, mode=kind, align_corners=coords == "align_corners", **interpolate)
        raise InputError(
            f"{node.name}: Resize mode {mode}, {coords}, nearest_mode {nearest}"
            f"{', antialias' if antialias else ''} is not supported by calibration"
        )


def write_back(model: ir.Model, values: dict[str, np.ndarray]) -> None:
    """Replace initializer values by name (shapes and dtypes must match): nothing else changes."""
    for name, array in values.items():
        value = model.graph.initializers.get(name)
        if value is None:
            raise KeyError(f"no initializer named {name!r}")
        old = value.const_value
        if tuple(old.shape.numpy()) != array.shape:
            raise ValueError(f"{name}: shape {array.shape} != {tuple(old.shape.numpy())}")
        value.const_value = ir.tensor(array.astype(old.dtype.numpy()), name=name)


def load_module(path: str | os.PathLike) -> tuple[ir.Model, OnnxModule]:
    """The ONNX model (onnx_ir) and its PyTorch execution."""
    model = model_io.load(path)
    return model, OnnxModule(model).eval()
