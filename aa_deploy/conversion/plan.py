"""Deciding what to do at each site: mode, filter taps, padding, fallbacks, shared blurs, skips.

Pure: reads Sites and Options, mutates nothing, so `inspect` prints exactly what `convert` will do.
The PyTorch twin takes its vocabulary (modes, paddings, the padding fallback) from here too.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from aa_deploy.common import graph
from aa_deploy.common.errors import SettingError
from aa_deploy.conversion import filters
from aa_deploy.conversion.blur_nodes import BlurSpec
from aa_deploy.conversion.sites import Site
from aa_deploy.conversion.sites.levels import site_levels
from aa_deploy.conversion.sites.site import SiteKind

MODES = ("auto", "pre", "blurpool")
PADS = ("reflect", "replicate", "zero")
PHASES = ("all", "diagonal")  # dense sampling: every phase, or the diagonal ones, (0, 0) and (1, 1) at stride 2
POOLING: tuple[SiteKind, ...] = ("max-pool", "average-pool")


@dataclass(frozen=True)
class Options:
    """What the user asked for."""

    filter: str = "triangle"
    filter_size: int | None = None
    mode: str = "auto"  # auto: blurpool for pooling, pre for everything else
    pad: str = "reflect"
    skip_stem: bool | None = None  # None: skip the stem only when it subsamples the input image itself
    include: str | None = None
    exclude: str | None = None
    dense_last: int = 0  # the last N resolution levels' sites run at stride 1, what follows dilated
    phases: str = "all"  # which sampling phases of the dense levels are averaged (`aa_deploy.conversion.phases`)

    def __post_init__(self) -> None:
        filters.filter_size(self.filter, self.filter_size)  # validates
        if not isinstance(self.dense_last, int) or self.dense_last < 0:
            raise SettingError("dense-last", "must be a whole number >= 0", self.dense_last)
        if self.phases not in PHASES:
            raise SettingError("phases", f"must be one of {', '.join(PHASES)}", self.phases)
        if self.phases != "all" and not self.dense_last:
            raise SettingError(
                "phases",
                "needs dense sampling",
                self.phases,
                f"--phases {self.phases} chooses among the phases of dense sampling: give --dense-last N",
            )
        if self.mode not in MODES:
            raise SettingError("mode", f"must be one of {', '.join(MODES)}", self.mode)
        if self.pad not in PADS:
            raise SettingError("pad", f"must be one of {', '.join(PADS)}", self.pad)
        for pattern in (self.include, self.exclude):
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise SettingError(
                        "include" if pattern == self.include else "exclude",
                        "must be a regular expression",
                        pattern,
                        f"bad regular expression {pattern!r}: {e}",
                    ) from None

    @property
    def size(self) -> int:
        return filters.filter_size(self.filter, self.filter_size)

    @property
    def filter_label(self) -> str:
        return f"binomial{self.filter_size}" if self.filter_size is not None else self.filter

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(eq=False)
class Action:
    """The decision for one site."""

    site: Site
    action: str  # pre | blurpool | dense | skip
    note: str = ""
    spec: BlurSpec | None = None
    shared_with: int | None = None  # index of the action whose blur node this one reuses
    restride: bool = False  # pre on a 1x1 conv: the blur takes the stride, the conv runs at stride 1
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        out = self.site.describe() | {"action": self.action, "note": self.note}
        if self.spec is not None:
            out |= {"taps": [len(t) for t in self.spec.taps], "pad": self.spec.pad_mode}
        if self.shared_with is not None:
            out["shared_with"] = self.shared_with
        return out


def mode_for(kind: str, mode: str) -> str:
    """The mode a site of `kind` gets under the user's `mode`."""
    if mode == "auto":
        return "blurpool" if kind in POOLING else "pre"
    return mode


def pad_mode_for(pad: str, pads: tuple[tuple[int, int], ...], sizes: tuple[int | None, ...]) -> str:
    """`reflect` needs every pad smaller than its axis: fall back to `replicate` where a map is too small."""
    if pad == "reflect" and any(size is not None and max(p) >= size for p, size in zip(pads, sizes)):
        return "replicate"
    return pad


def selected(names: tuple[str, ...], options: Options) -> str | None:
    """Why the user's `--include`/`--exclude` leave out a site known by `names` (node name and module
    scope in a graph, the module path in the twin), or None if it is in."""
    if options.include is not None and not any(re.search(options.include, n) for n in names if n):
        return f"not matched by --include {options.include}"
    if options.exclude is not None and any(re.search(options.exclude, n) for n in names if n):
        return f"matched by --exclude {options.exclude}"
    return None


IMAGE_CHANNELS = 4  # grey, RGB, RGBA
PASS_THROUGH = ("Cast", "Identity", "Transpose", "Sub", "Add", "Mul", "Div", "Pad")  # normalization, layout
SKIP_STEM = "stem (--skip-stem)"
IMAGE_STEM = "stem on the input image (--blur-stem blurs it)"


def stem_skip(options: Options, on_image: bool) -> str | None:
    """Why the first site is left alone (`SKIP_STEM`, `IMAGE_STEM`), or None: the one rule of the ONNX
    pass and the twin, which differ only in how they tell that the site is `on_image`."""
    if options.skip_stem:
        return SKIP_STEM
    return IMAGE_STEM if options.skip_stem is None and on_image else None


def reads_image(site: Site) -> bool:
    """Whether `site` is a strided conv on the model's input image: at most 4 channels, fed by a graph
    input directly or through normalization / layout ops with constant other operands. The image was
    resized with an anti-aliasing filter before it reached the model, so a blur there removes detail,
    not aliasing; Zhang's anti-aliased ResNets and Composer's BlurPool leave that conv alone as well."""
    if site.kind != "strided-conv" or site.channels is None or site.channels > IMAGE_CHANNELS:
        return False
    value = site.value
    while (node := value.producer()) is not None:
        live = [v for v in node.inputs if v is not None and graph.const_array(v) is None]
        if not graph.is_onnx(node, *PASS_THROUGH) or len(live) != 1:
            return False
        value = live[0]
    return value.is_graph_input() and graph.const_array(value) is None  # not an initializer listed as input


ALREADY_BLURRED = "already anti-aliased (reads a fixed blur)"
IDENTITY = "a 1-tap filter is the identity"
NO_CHANNELS = "channel count unknown (no static shape information)"
POINTWISE = "1x1 conv: blurpool equals pre, at a quarter of the cost"


def skip_reason(
    options: Options,
    names: tuple[str, ...],
    *,
    first: bool,
    on_image: bool,
    protected: bool = False,
    channels_known: bool = True,
) -> str | None:
    """Why a site is left alone, or None: the one rule of the ONNX pass and the twin (the twin sees
    no fixed blurs and always knows its channel counts)."""
    if protected:
        return ALREADY_BLURRED
    if first and (reason := stem_skip(options, on_image)):
        return reason
    if options.size == 1:
        return IDENTITY
    if not channels_known:
        return NO_CHANNELS
    return selected(names, options)


def site_mode(kind: str, options: Options, *, pointwise: bool, obstacle: str | None) -> tuple[str, str]:
    """(mode, note) for a site: the user's mode for `kind`, except that blurpool falls back to pre on a
    pointwise conv (the same function, cheaper) and where the site says why blurpool cannot apply."""
    mode = mode_for(kind, options.mode)
    if mode == "blurpool" and pointwise:
        return "pre", POINTWISE
    if mode == "blurpool" and obstacle is not None:
        return "pre", f"pre instead of blurpool: {obstacle}"
    return mode, ""


DENSE = "dense: stride 1, the layers after it dilated (every sampling phase computed, then averaged)"
DIAGONAL = "dense, diagonal phases: one copy per phase, stacked on the batch axis, averaged at the pool"


def dense_choice(levels: list[int], n: int) -> set[int]:
    """Indices of the sites that dense sampling changes: those of the `n` coarsest resolution levels
    (`levels[i]`: the total subsampling factor of the map site i reads). The one rule of the ONNX pass
    and the twin, which differ only in how they find the levels."""
    if n <= 0:
        return set()
    chosen = set(sorted(set(levels))[-n:])
    return {i for i, level in enumerate(levels) if level in chosen}


def plan(sites: list[Site], options: Options) -> list[Action]:
    """One Action per site, in site order."""
    actions: list[Action] = []
    shared: dict[tuple, int] = {}
    dense = dense_choice(site_levels(sites), options.dense_last) if options.dense_last else set()
    for i, site in enumerate(sites):
        if i in dense:
            actions.append(Action(site, "dense", DENSE if options.phases == "all" else DIAGONAL))
            continue
        skip = skip_reason(
            options,
            (site.name, site.scope),
            first=i == 0,
            on_image=i == 0 and reads_image(site),
            protected=site.protected,
            channels_known=site.channels is not None,
        )
        if skip is not None:
            actions.append(Action(site, "skip", skip))
            continue
        action = _blur(site, options)
        if action.action == "pre":
            key = (id(site.value), id(site.node.graph), action.spec)  # a blur serves the graph it is in
            if key in shared:
                action.shared_with = shared[key]
                action.note = "; ".join(filter(None, [action.note, f"shares the blur of site {shared[key]}"]))
            else:
                shared[key] = i
        actions.append(action)
    return actions


def _blur(site: Site, options: Options) -> Action:
    """The blur one site gets (pre or blurpool, its taps, padding and stride), or a skip where its channel
    count is unknown."""
    mode, note = site_mode(site.kind, options, pointwise=site.pointwise, obstacle=site.blurpool)
    # A 1x1 conv (no padding, no auto_pad) reading the tensor directly keeps only every s-th blurred
    # pixel: the blur can take the stride itself (same numbers, 1/s^n of the blur's work) and the
    # conv run at stride 1.
    restride = (
        mode == "pre"
        and site.kind == "strided-conv"
        and site.pointwise
        and site.blurpool is None
        and site.readers == (site.node,)
    )
    if restride:
        note = "; ".join(filter(None, [note, "1x1 conv: blur at the conv's stride, conv at stride 1"]))
    taps = tuple(filters.taps_1d(options.size, s) for s in site.strides)
    pads = tuple(filters.padding(len(t)) for t in taps)
    sizes = site.sizes if mode == "pre" or site.stride1_sizes is None else site.stride1_sizes
    pad_mode = pad_mode_for(options.pad, pads, sizes)
    if pad_mode != options.pad:
        note = "; ".join(filter(None, [note, f"reflect -> replicate: map of {min(s for s in sizes if s)} px"]))
    channels = site.channels if mode == "pre" else site.out_channels
    if channels is None:
        return Action(site, "skip", "output channel count unknown")
    spec = BlurSpec(
        channels=channels,
        rank=site.rank,
        channel_axis=site.channel_axis,
        axes=site.axes,
        taps=taps,
        strides=site.strides if mode == "blurpool" or restride else (1,) * len(taps),
        pads=pads,
        pad_mode=pad_mode,
        guarded=pad_mode == "reflect" and any(size is None for size in sizes),
    )
    return Action(site, mode, note, spec, restride=restride)
