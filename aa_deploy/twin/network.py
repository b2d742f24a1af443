"""The PyTorch twin: the same anti-aliasing transformation on an nn.Module.

`antialias(model, ...)` wraps every downsampling module it can see, with the taps from
`aa_deploy.conversion.filters` and the modes, paddings and fallbacks from `aa_deploy.conversion.plan`, so the ONNX pass
and the twin compute the same function. It is the reference for parity checks, and a starting
point for fine-tuning with the blur in place.

Sites it sees: strided Conv1d/2d/3d, MaxPool/AvgPool1d/2d/3d with stride > 1, torchvision's and
timm's Swin `PatchMerging` (channels-last), and any module declaring `antialias_site =
"strided-slice"` with a `stride` (e.g. the CIFAR ResNet's option-A shortcut). Sites are numbered in
`named_modules()` order; `skip_stem` leaves the first one, `include`/`exclude` match module paths.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from aa_deploy.common.errors import InputError
from aa_deploy.conversion import filters
from aa_deploy.conversion.plan import (
    DENSE,
    IMAGE_CHANNELS,
    POOLING,
    Options,
    dense_choice,
    pad_mode_for,
    site_mode,
    skip_reason,
)
from aa_deploy.conversion.sites import strided_slice
from aa_deploy.conversion.sites.pooling import CEIL_MODE, acts_globally
from aa_deploy.conversion.sites.site import SiteKind
from aa_deploy.conversion.sites.strided_conv import is_pointwise
from aa_deploy.twin import phases as twin_phases

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_MAXPOOL = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_AVGPOOL = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_TORCH_PAD = {"reflect": "reflect", "replicate": "replicate", "zero": "constant"}


def _tuple(v, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


class Blur(nn.Module):
    """Fixed depthwise blur over some spatial axes, with the ONNX pass's padding and fallback rules."""

    def __init__(
        self, spatial_rank: int, strides: tuple[int, ...], size: int, pad: str, channels_last: bool = False
    ) -> None:
        super().__init__()
        self.strides = strides  # one per spatial axis; 1 = not blurred... unless blurred at stride 1
        self.pad = pad
        self.channels_last = channels_last
        self.blurred = tuple(s > 1 for s in strides)
        self.conv_strides: tuple[int, ...] = (1,) * spatial_rank
        taps = [filters.taps_1d(size, s) if b else (1.0,) for s, b in zip(strides, self.blurred)]
        self.pads = tuple(filters.padding(len(t)) for t in taps)
        self.register_buffer("kernel", torch.from_numpy(filters.kernel(taps, dtype="float64")), persistent=False)

    def at_stride(self) -> Blur:
        """This blur applied with the site's stride (blurpool form) instead of stride 1 (pre form)."""
        self.conv_strides = self.strides
        return self

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.channels_last:
            x = x.movedim(-1, 1)
        sizes = x.shape[2:]
        mode = pad_mode_for(
            self.pad,
            tuple(p for p, b in zip(self.pads, self.blurred) if b),
            tuple(int(s) for s, b in zip(sizes, self.blurred) if b),
        )
        flat = [p for lo_hi in reversed(self.pads) for p in lo_hi]
        if any(flat):
            x = F.pad(x, flat, mode=_TORCH_PAD[mode])
        c = x.shape[1]
        weight = self.kernel.to(x.dtype).expand(c, 1, *self.kernel.shape)
        conv = (F.conv1d, F.conv2d, F.conv3d)[x.dim() - 3]
        y = conv(x, weight, bias, stride=self.conv_strides, groups=c)
        return y.movedim(1, -1) if self.channels_last else y

    def extra_repr(self) -> str:
        return f"kernel={tuple(self.kernel.shape)}, stride={self.conv_strides}, pad={self.pad}"


class PreBlur(nn.Module):
    """`module(blur(x))`: blur at stride 1 in front of an unchanged downsampling module."""

    def __init__(self, module: nn.Module, blur: Blur) -> None:
        super().__init__()
        self.blur = blur
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(self.blur(x))


class ConvBlurPool(nn.Module):
    """The conv at stride 1 without its bias, then the blur at the conv's stride, plus the bias."""

    def __init__(self, conv: nn.Module, blur: Blur) -> None:
        super().__init__()
        self.conv = conv
        self.blur = blur.at_stride()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        padding = conv.padding
        if conv.padding_mode != "zeros":
            x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
            padding = 0
        fn = (F.conv1d, F.conv2d, F.conv3d)[x.dim() - 3]
        y = fn(x, conv.weight, None, 1, padding, conv.dilation, conv.groups)
        return self.blur(y, bias=conv.bias)


def _acts_globally(pool: nn.Module, x: torch.Tensor) -> bool:
    """`sites.pooling.acts_globally` for a pooling module on `x` (PyTorch pads both ends alike)."""
    n = x.dim() - 2
    padding = _tuple(pool.padding, n)
    return acts_globally(_tuple(pool.kernel_size, n), tuple(x.shape[2:]), (*padding, *padding))


class PoolBlurPool(nn.Module):
    """The pool at stride 1, then the blur at the pool's stride (MaxBlurPool for MaxPool)."""

    def __init__(self, pool: nn.Module, blur: Blur) -> None:
        super().__init__()
        self.pool = pool
        self.blur = blur.at_stride()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool, n = self.pool, x.dim() - 2
        kernel, padding = _tuple(pool.kernel_size, n), _tuple(pool.padding, n)
        if _acts_globally(pool, x):
            return pool(x)  # a global pool at this size: not a site, as in the ONNX pass
        if isinstance(pool, _MAXPOOL):
            fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[n - 1]
            y = fn(x, kernel, 1, padding, pool.dilation)
        else:
            fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[n - 1]
            extra = {} if n == 1 else {"divisor_override": pool.divisor_override}
            y = fn(x, kernel, 1, padding, False, pool.count_include_pad, **extra)
        return self.blur(y)


class GuardedPreBlur(PreBlur):
    """PreBlur for pools: no blur when the pool acts as a global pool at the input's size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _acts_globally(self.module, x):
            return self.module(x)
        return super().forward(x)


class DenseSite(nn.Module):
    """A dense site (`--dense-last`): the module at stride 1, its input extended with `extra` pixels at
    the far ends (zeros; -inf for a max pool) so that its map is exactly `stride` times the original's,
    as the ONNX pass extends the node's far padding."""

    def __init__(
        self, module: nn.Module, extra: tuple[int, int], fill: float, pre: tuple[int, int, int, int] = (0, 0, 0, 0)
    ) -> None:
        super().__init__()
        self.module = module
        self.extra = extra
        self.fill = fill
        self.pre = pre  # left, right, top, bottom: a TF-"same" conv's own padding, made static

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.pre):
            x = F.pad(x, self.pre)
        if any(self.extra):
            x = F.pad(x, (0, self.extra[1], 0, self.extra[0]), value=self.fill)
        return self.module(x)


def _static_same(conv: nn.Conv2d, size: tuple[int, int], factor: tuple[int, int]) -> tuple[nn.Conv2d, tuple]:
    """A conv that computes TF-"same" padding from its stride in `forward` (timm's Conv2dSame): at stride 1
    it would pad differently, so its padding for the original stride on a map of `size`, times `factor`,
    goes before a plain conv with the same parameters (left, right, top, bottom)."""
    totals = [
        max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        for n, k, s, d in zip(size, conv.kernel_size, conv.stride, conv.dilation)
    ]
    (top, left), (bottom, right) = [(t // 2) for t in totals], [t - t // 2 for t in totals]
    plain = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        0,
        conv.dilation,
        conv.groups,
        conv.bias is not None,
    )
    plain.weight = conv.weight
    plain.bias = conv.bias
    pre = (left * factor[1], right * factor[1], top * factor[0], bottom * factor[0])
    return plain, pre


_PADS = (nn.ZeroPad2d, nn.ConstantPad2d)


def _spatial_trace(model: nn.Module, sample: torch.Tensor) -> dict[nn.Module, tuple[tuple, tuple]]:
    """module -> (input, output) spatial sizes at its first call on `sample`."""
    seen: dict[nn.Module, tuple[tuple, tuple]] = {}

    def hook(module, inputs, output) -> None:
        if module not in seen and inputs and isinstance(inputs[0], torch.Tensor) and isinstance(output, torch.Tensor):
            seen[module] = (tuple(inputs[0].shape[2:]), tuple(output.shape[2:]))

    run_with_hooks(model, sample, [(m, hook) for m in model.modules()])
    return seen


def run_with_hooks(model: nn.Module, x: torch.Tensor, hooks: list) -> None:
    """One forward pass of `model` on `x` without gradients, with forward hooks `(module, hook)` in
    place for it only (a hook must return None, or it replaces the module's output)."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()


def _scale(values, factor: tuple[int, int]) -> tuple[int, int]:
    return tuple(v * f for v, f in zip(_tuple(values, 2), factor))


def _dilate(module: nn.Module, factor: tuple[int, int], path: str) -> None:
    """Dilations and padding of one 2-D module times `factor` (the map it reads is that much denser)."""
    if isinstance(module, _PADS):
        left, right, top, bottom = module.padding
        module.padding = (left * factor[1], right * factor[1], top * factor[0], bottom * factor[0])
    elif isinstance(module, (nn.Conv2d, nn.MaxPool2d)):
        module.dilation = _scale(module.dilation, factor)
        if not isinstance(module.padding, str):
            module.padding = _scale(module.padding, factor)
            if isinstance(module, nn.Conv2d):
                module._reversed_padding_repeated_twice = [p for p in reversed(module.padding) for _ in range(2)]
    elif isinstance(module, nn.AvgPool2d) and _tuple(module.kernel_size, 2) != (1, 1):
        raise InputError(f"--dense-last: the twin cannot dilate the average pool {path!r} (no dilation in PyTorch)")


def _denser(sites: list, dense: set[int], trace: dict) -> tuple[tuple, dict[tuple, tuple[int, int]]]:
    """The first dense level's input size, and how much denser each map size becomes: 1 at that input, times
    each dense site's stride after it (sizes, not their ratios: a stride-2 site maps 17 px to 9)."""
    first = max((trace[sites[i][1]][0] for i in dense), key=lambda size: size[0] * size[1])
    denser: dict[tuple, tuple[int, int]] = {first: (1, 1)}
    for i in sorted(dense, key=lambda i: -math.prod(trace[sites[i][1]][0])):
        size_in, size_out = trace[sites[i][1]]
        f = denser.get(size_in, (1, 1))
        denser[size_out] = tuple(fi * s for fi, s in zip(f, sites[i][3]))
    return first, denser


def densify(model: nn.Module, sites: list, dense: set[int], trace: dict) -> None:
    """Dense sampling on the twin, in place: the `dense` sites (indices into `sites`) at stride 1, every
    2-D conv, max pool and padding module that reads a denser map dilated by the factor it is denser.
    Where a module sits is read from its input size in `trace` (`_spatial_trace` on a sample; the ONNX
    pass follows the graph)."""
    if any(trace.get(sites[i][1]) is None or len(trace[sites[i][1]][0]) != 2 for i in dense):
        raise InputError("--dense-last: the twin's dense sites must be 2-D modules the sample reaches")
    first, denser = _denser(sites, dense, trace)

    def factor(size: tuple) -> tuple[int, int]:
        return denser.get(size, (1, 1))

    site_modules = {id(sites[i][1]): i for i in dense}
    names = {m: n for n, m in model.named_modules()}
    # Whole-map pools stay global on the dense map, as the ONNX pass makes them global pools (before the
    # stride check: such a pool's stride is its size).
    whole = [
        m for m in trace if _global_on(m, trace) and _tuple(m.padding, 2) == (0, 0) and factor(trace[m][0]) != (1, 1)
    ]
    for module in whole:
        _set(
            model,
            names.pop(module),
            nn.AdaptiveAvgPool2d(1) if isinstance(module, nn.AvgPool2d) else nn.AdaptiveMaxPool2d(1),
        )
    twin_phases.whole_map_pools(model, trace, factor)
    for module, (size_in, _) in trace.items():
        if module not in names:
            continue  # replaced (a whole-map pool)
        if len(size_in) != 2 or size_in[0] * size_in[1] > first[0] * first[1]:
            continue  # before the dense levels (or not a map)
        if id(module) in site_modules:
            continue
        f = factor(size_in)
        inside_site = any(names[module].startswith(names[sites[i][1]] + ".") for i in dense)
        stride = getattr(module, "stride", 1)
        if (
            not inside_site
            and isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d))
            and any(s > 1 for s in _tuple(stride or 1, 2))
        ):
            raise InputError(f"--dense-last: {names[module]!r} subsamples after a dense site: give a larger N")
        if f != (1, 1):
            _dilate(module, f, names[module])
    site_names = [names[sites[i][1]] for i in dense]
    twin_phases.split_pools(
        model,
        trace,
        factor,
        lambda m: any(names.get(m, "") == n or names.get(m, "").startswith(n + ".") for n in site_names),
    )
    for i in sorted(dense):
        path, module, kind, strides, _ = sites[i]
        size_in, size_out = trace[module]
        _set(model, path, _dense_site(module, path, kind, strides, size_in, size_out, factor(size_in)))


def _dense_site(module: nn.Module, path: str, kind: str, strides, size_in, size_out, f) -> DenseSite:
    """One dense site: `module` at stride 1 reading a map `f` times denser than the original's `size_in`,
    its far border extended so that its map is exactly `stride` times the original's `size_out`."""
    pre = (0, 0, 0, 0)
    if kind == "strided-slice":
        module.stride = 1
    else:
        if type(module).__name__ == "Conv2dSame":  # pads in forward from its stride
            module, pre = _static_same(module, size_in, f)
        _dilate(module, f, path)
        module.stride = (1, 1)
    target = tuple(fi * s * o for fi, s, o in zip(f, strides, size_out))
    extra = (0, 0)
    if kind != "strided-slice":
        channels = module.in_channels if isinstance(module, nn.Conv2d) else 1
        with torch.no_grad():
            x = torch.zeros(1, channels, *(fi * d for fi, d in zip(f, size_in)))
            got = DenseSite(module, (0, 0), 0.0, pre)(x).shape[2:]
        extra = tuple(int(t - g) for t, g in zip(target, got))
    fill = float("-inf") if kind == "max-pool" else 0.0
    return DenseSite(module, extra, fill, pre)


@dataclass
class TwinSite:
    """One module the twin changed (or left alone), in the ONNX pass's vocabulary."""

    name: str
    kind: SiteKind
    strides: tuple[int, ...]
    action: str
    note: str = ""


def _site_of(module: nn.Module) -> tuple[str, tuple[int, ...], bool] | None:
    """(kind, per-spatial-axis strides, channels_last) for a downsampling module, else None."""
    if isinstance(module, (Blur, PreBlur, ConvBlurPool, PoolBlurPool)):
        return None
    if isinstance(module, _CONV):
        strides = _tuple(module.stride, module.weight.dim() - 2)
        return ("strided-conv", strides, False) if any(s > 1 for s in strides) else None
    if isinstance(module, _MAXPOOL + _AVGPOOL):
        n = (
            1
            if isinstance(module, (nn.MaxPool1d, nn.AvgPool1d))
            else 2
            if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d))
            else 3
        )
        strides = _tuple(module.stride if module.stride else module.kernel_size, n)
        kind = "max-pool" if isinstance(module, _MAXPOOL) else "average-pool"
        return (kind, strides, False) if any(s > 1 for s in strides) else None
    if type(module).__name__ in ("PatchMerging", "PatchMergingV2") and type(module).__module__.split(".")[0] in (
        "timm",
        "torchvision",
    ):
        return ("patch-merge", (2, 2), True)
    if getattr(module, "antialias_site", None) == "strided-slice":
        return ("strided-slice", _tuple(module.stride, 2), False)
    return None


def find_sites(model: nn.Module) -> list[tuple[str, nn.Module, str, tuple[int, ...], bool]]:
    """(path, module, kind, strides, channels_last) for each site, outermost first, in module order."""
    found = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        site = _site_of(module)
        if site is not None:
            found.append((name, module, *site))
            inside.append(name)
    return found


def _on_image(module: nn.Module, kind: SiteKind) -> bool:
    """`plan.reads_image` for a module: the first site, a strided conv with at most 4 input channels
    (the graph's data flow is not visible here; a converted model's metadata records the ONNX pass's
    decision, which `antialias_with` then follows)."""
    return kind == "strided-conv" and module.in_channels <= IMAGE_CHANNELS


def _pointwise(module: nn.Module, kind: SiteKind) -> bool:
    """`sites.strided_conv.is_pointwise` for a conv module."""
    if kind != "strided-conv" or isinstance(module.padding, str) and module.padding != "valid":
        return False
    return is_pointwise(module.kernel_size, () if module.padding == "valid" else _tuple(module.padding, 1))


def _obstacle(module: nn.Module, kind: SiteKind) -> str | None:
    """Why the site cannot take the blurpool form, in the site modules' words (None: it can)."""
    if kind in POOLING:
        return CEIL_MODE if module.ceil_mode else None
    if kind in ("strided-slice", "patch-merge"):
        return strided_slice.BLURPOOL_OBSTACLE
    return None


def _set(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, new)


def antialias(
    model: nn.Module,
    filter: str = "triangle",
    mode: str = "auto",
    pad: str = "reflect",
    *,
    filter_size: int | None = None,
    skip_stem: bool | None = None,
    include: str | None = None,
    exclude: str | None = None,
    inplace: bool = False,
) -> tuple[nn.Module, list[TwinSite]]:
    """The anti-aliased twin of `model` (a copy unless `inplace`) and what was done at each site."""
    options = Options(filter, filter_size, mode, pad, skip_stem, include, exclude)
    return antialias_with(model, options, inplace=inplace)


def _global_on(module: nn.Module, trace: dict) -> bool:
    """A 2-D pooling module whose window covers the whole map it read in `trace`."""
    if not isinstance(module, (nn.AvgPool2d, nn.MaxPool2d)) or len(trace.get(module, ((),))[0]) != 2:
        return False
    padding = _tuple(module.padding, 2)
    return acts_globally(_tuple(module.kernel_size, 2), trace[module][0], (*padding, *padding))


def _levels(sites: list, trace: dict, area: int) -> list[int]:
    """Each site's total subsampling factor (area) from its input size in `trace` on an image of `area`
    pixels: `plan.dense_choice`'s levels."""
    return [area // max(1, math.prod(trace.get(module, ((1, 1), ()))[0])) for _, module, *_ in sites]


def antialias_with(
    model: nn.Module, options: Options, *, inplace: bool = False, sample: torch.Tensor | None = None
) -> tuple[nn.Module, list[TwinSite]]:
    """`antialias` with an `Options` record (e.g. read back from a converted model's metadata).
    Dense sampling (`options.dense_last`) needs a `sample` input: where a module sits is read from its
    input size."""
    if not inplace:
        model = copy.deepcopy(model)
    report = []
    sites = find_sites(model)
    dense: set[int] = set()
    if options.phases != "all":
        raise InputError(f"--phases {options.phases}: the twin computes every phase; a phase subset runs as ONNX only")
    if options.dense_last:
        if sample is None:
            raise InputError("--dense-last: the twin needs a sample input to find the resolution levels")
        trace = _spatial_trace(model, sample)
        # a pool whose window covers its whole map subsamples nothing: no site for the ONNX pass either
        sites = [s for s in sites if not _global_on(s[1], trace)]
        dense = dense_choice(_levels(sites, trace, sample.shape[2] * sample.shape[3]), options.dense_last)
        densify(model, sites, dense, trace)
    for i, (name, module, kind, strides, channels_last) in enumerate(sites):
        if i in dense:
            report.append(TwinSite(name, kind, strides, "dense", DENSE))
            continue
        skip = skip_reason(options, (name,), first=i == 0, on_image=i == 0 and _on_image(module, kind))
        if skip is not None:
            report.append(TwinSite(name, kind, strides, "skip", skip))
            continue
        blur = Blur(len(strides), strides, options.size, options.pad, channels_last)
        mode, note = site_mode(kind, options, pointwise=_pointwise(module, kind), obstacle=_obstacle(module, kind))
        if mode == "pre":
            new: nn.Module = GuardedPreBlur(module, blur) if kind in POOLING else PreBlur(module, blur)
        elif kind == "strided-conv":
            new = ConvBlurPool(module, blur)
        else:
            new = PoolBlurPool(module, blur)
        _set(model, name, new)
        report.append(TwinSite(name, kind, strides, mode, note))
    return model, report


def options_from_metadata(metadata: dict) -> Options:
    """The Options a converted model was made with (its aa_deploy.options metadata)."""
    return Options(**metadata["options"])
