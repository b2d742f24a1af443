"""Whole-map pools in the PyTorch twin's dense levels, as the ONNX pass treats them (`dense`, `dense_nodes`).

Inside a module of a dense level whose map keeps its size (a block, a squeeze-excitation, a global
response norm), a pool over the whole map would mix the phases that the dense map holds side by side.
While such a module runs, `PerPhasePools` catches those pools (a mean, sum, max or 2-norm over both
spatial axes with the dims kept, an adaptive pool to 1x1) on a map of the dense size, pools each phase
on its own and puts the result back at every position of that phase: what follows (1x1 convs,
activations, the gating product) computes per position, so it equals the graph's gate computed once
per phase and tiled. Pools elsewhere (the head's) are left alone: they average the phases, as intended.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

_REDUCTIONS = {
    torch.mean: torch.mean,
    torch.Tensor.mean: torch.mean,
    torch.sum: torch.sum,
    torch.Tensor.sum: torch.sum,
    torch.amax: torch.amax,
    torch.Tensor.amax: torch.amax,
}
_NORMS = (torch.norm, torch.Tensor.norm, torch.linalg.vector_norm)


def _l2(x: torch.Tensor, dim, keepdim: bool) -> torch.Tensor:
    return torch.linalg.vector_norm(x, 2, dim=dim, keepdim=keepdim)


class PerPhasePools(TorchFunctionMode):
    """Whole-map pools of a map `size` x `factor` split into the `factor` phases along each axis."""

    def __init__(self, size: tuple[int, int], factor: tuple[int, int]) -> None:
        super().__init__()
        self.size = size
        self.factor = factor
        self.dense = tuple(s * f for s, f in zip(size, factor))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        pooled = self._pool(func, args, kwargs)
        return pooled if pooled is not None else func(*args, **kwargs)

    def _pool(self, func, args, kwargs) -> torch.Tensor | None:
        if not args or not isinstance(args[0], torch.Tensor):
            return None
        x = args[0]
        if func in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d):
            out = kwargs.get("output_size", args[1] if len(args) > 1 else None)
            if x.dim() == 4 and out in (1, (1, 1), [1, 1]):
                return self._split(x, (2, 3), torch.mean if func is F.adaptive_avg_pool2d else torch.amax)
            return None
        if func in _REDUCTIONS:
            reduce, dim, keep = _REDUCTIONS[func], kwargs.get("dim", args[1] if len(args) > 1 else None), None
            keep = kwargs.get("keepdim", args[2] if len(args) > 2 else False)
        elif func in _NORMS:
            p = kwargs.get("p", kwargs.get("ord", args[1] if len(args) > 1 else 2))
            if p not in (2, 2.0, "fro", None):
                return None
            reduce, dim = _l2, kwargs.get("dim", args[2] if len(args) > 2 else None)
            keep = kwargs.get("keepdim", args[3] if len(args) > 3 else False)
        else:
            return None
        if not keep or dim is None:
            return None
        dims = tuple(sorted(d % x.dim() for d in ((dim,) if isinstance(dim, int) else dim)))
        return self._split(x, dims, reduce)

    def _split(self, x: torch.Tensor, dims: tuple[int, ...], reduce) -> torch.Tensor | None:
        if len(dims) != 2 or tuple(x.shape[d] for d in dims) != self.dense:
            return None
        a, b = dims
        shape = list(x.shape)
        split = (
            shape[:a]
            + [self.size[0], self.factor[0]]
            + shape[a + 1 : b]
            + [self.size[1], self.factor[1]]
            + shape[b + 1 :]
        )
        pooled = reduce(x.reshape(split), dim=(a, b + 1), keepdim=True)
        phases = shape[:a] + [self.factor[0]] + shape[a + 1 : b] + [self.factor[1]] + shape[b + 1 :]
        repeats = [1] * len(shape)
        repeats[a], repeats[b] = self.size
        return pooled.reshape(phases).repeat(repeats)


class WholeMapPools(TorchFunctionMode):
    """A functional average or max pool whose window is the original's whole map (`F.avg_pool2d(x, 8)`
    on an 8x8 map) is the global pool; on the dense map it stays one: an adaptive pool to 1x1, as the
    ONNX pass makes such a pool a GlobalAveragePool. `dense`: a dense map size -> the original sizes it
    can stand for (with two dense levels, 16 px at 2x and 8 px at 4x are both 32 px)."""

    def __init__(self, dense: dict[tuple[int, int], set[tuple[int, int]]]) -> None:
        super().__init__()
        self.dense = dense

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in ("avg_pool2d", "max_pool2d") and args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
            x = args[0]
            kernel = kwargs.get("kernel_size", args[1] if len(args) > 1 else None)
            kernel = tuple(kernel) if isinstance(kernel, tuple | list) else (kernel, kernel)
            padding = kwargs.get("padding", args[3] if len(args) > 3 else 0)
            if kernel in self.dense.get(tuple(x.shape[2:]), ()) and padding in (0, (0, 0), [0, 0]):
                return (F.adaptive_avg_pool2d if name == "avg_pool2d" else F.adaptive_max_pool2d)(x, 1)
        return func(*args, **kwargs)


def _run_under(module: nn.Module, mode: TorchFunctionMode) -> None:
    """Hooks that enter `mode` when `module`'s forward starts and leave it when it ends (or fails)."""
    module.register_forward_pre_hook(lambda m, i: mode.__enter__() and None)
    module.register_forward_hook(lambda m, i, o: mode.__exit__(None, None, None), always_call=True)


def whole_map_pools(model: nn.Module, trace: dict, factor) -> None:
    """`WholeMapPools` over the model's forward, for the functional whole-map pools of the dense levels
    (pooling modules are replaced by the twin itself)."""
    dense: dict[tuple[int, int], set[tuple[int, int]]] = {}
    for size_in, _ in trace.values():
        f = factor(size_in) if len(size_in) == 2 else (1, 1)
        if f != (1, 1):
            dense.setdefault(tuple(s * g for s, g in zip(size_in, f)), set()).add(tuple(size_in))
    if dense:
        _run_under(model, WholeMapPools(dense))


def split_pools(model: nn.Module, trace: dict, factor, inside_sites) -> None:
    """Every outermost module of a dense level whose map keeps its size runs under `PerPhasePools`.
    `trace`: module -> (input size, output size); `factor(size)`: how much denser a map of that
    original size is; `inside_sites(module)`: whether it belongs to a dense site."""
    covered: set[nn.Module] = set()  # the chosen modules and everything inside them
    for module in model.modules():  # parents before children
        size_in, size_out = trace.get(module, ((), ()))
        if module in covered or len(size_in) != 2 or size_in != size_out or factor(size_in) == (1, 1):
            continue
        if inside_sites(module):
            continue
        covered.update(module.modules())
        _run_under(module, PerPhasePools(size_in, factor(size_in)))
