"""Where does the aliasing happen? Per downsampling site, before and after conversion:

- aliasing: the share of the signal's energy above the site's Nyquist frequency (|f| > 1/(2s) along
  a strided axis) in the tensor that gets subsampled, averaged over images and channels. For a
  blurpool site that tensor is the stride-1 map seen through the blur's frequency response.
- equivariance error: shift the input circularly by the site's cumulative stride S (input size /
  output size); the site's output should move by exactly one cell:
  ||f(shift_S x) - roll(f(x), 1)|| / ||f(x)||, over the output without a two-cell border (the
  shifts are circular; at the border the model's padding, not aliasing, decides).
- sub-pixel error: shift the input by one pixel; the output has no exact answer, so compare with the
  bilinear interpolation between f(x) and its one-cell rolls, weighted 1/S:
  how much further the output moves than its neighbours' answers predict.

Sites and their tensors come from the site finders (and, for converted models, the site list the
conversion recorded), so the original and the converted model are probed at the same places.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from aa_deploy.common import inserted, model_io
from aa_deploy.common.progress import Progress, counter
from aa_deploy.conversion import blur_nodes
from aa_deploy.conversion.graph_pass import annotate_shapes
from aa_deploy.conversion.sites import find_sites, strided_slice
from aa_deploy.converters.onnxruntime import OnnxRuntimeRunner
from aa_deploy.twin.network import find_sites as module_sites
from aa_deploy.twin.network import run_with_hooks
from aa_deploy.twin.weights import conv_to_norm


@dataclass
class SiteProbe:
    index: int
    node: str
    kind: str
    strides: list[int]
    cumulative_stride: list[int] | None
    aliasing: float
    equivariance_error: float | None
    subpixel_error: float | None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Taps:
    """Where to read one site: the tensor before subsampling, its output, axes, and a filter response."""

    site: object
    pre: ir.Value
    out: ir.Value
    axes: tuple[int, ...]
    strides: tuple[int, ...]
    out_axes: tuple[int, ...]
    response: list | None  # per axis 1-D taps applied before subsampling (blurpool), else None


def _output_of(site) -> ir.Value:
    node = site.node
    if site.kind == "strided-slice":
        nodes, _ = strided_slice.tree_from(node)
        return nodes[-1].outputs[0]
    if site.kind == "patch-merge" and node.op_type == "Reshape":
        transpose = node.outputs[0].consumers()[0]
        return transpose.outputs[0].consumers()[0].outputs[0]
    return node.outputs[0]


def _taps_for(model: ir.Model) -> list[_Taps]:
    annotate_shapes(model)
    recorded = {s["node"]: s for s in model_io.read_metadata(model).get("sites", [])}
    by_name = {n.name: n for n in model.graph if n.name}
    found = {s.name: s for s in find_sites(model.graph)}
    out = []
    for name, entry in recorded.items() or ():
        if entry["action"] == "blurpool" and name in by_name:
            node = by_name[name]
            blur = inserted.blur_after(node)
            axes = tuple(entry["axes"])
            taps = blur_nodes.taps_of(blur, axes)
            site = type("Recorded", (), {"name": name, "kind": entry["kind"]})()
            out.append(_Taps(site, node.outputs[0], blur.outputs[0], axes, tuple(entry["stride"]), axes, taps))
    for name, site in found.items():
        if name in {t.site.name for t in out}:
            continue
        reader = site.readers[0]
        pre = next(v for v in reader.inputs if v is not None) if reader.op_type != "Pad" else reader.outputs[0]
        if site.kind in ("strided-conv", "max-pool", "average-pool") or site.node.op_type == "SpaceToDepth":
            pre = site.node.inputs[0]
        out.append(_Taps(site, pre, _output_of(site), site.axes, site.strides, site.axes, None))
    order = {n.name: i for i, n in enumerate(model.graph)}
    return sorted(out, key=lambda t: order.get(t.site.name, 0))


def _aliasing(x: np.ndarray, axes, strides, response) -> float:
    spectrum = np.abs(np.fft.fftn(x.astype(np.float64), axes=axes)) ** 2
    keep = np.ones(spectrum.shape, bool)
    for i, (a, s) in enumerate(zip(axes, strides)):
        f = np.abs(np.fft.fftfreq(x.shape[a]))
        shape = [1] * x.ndim
        shape[a] = -1
        if response is not None:
            h = np.abs(np.fft.fft(response[i], n=x.shape[a])) ** 2
            spectrum = spectrum * h.reshape(shape)
        keep &= (f <= 1.0 / (2 * s)).reshape(shape)
    total = spectrum.sum()
    return float(spectrum[~keep].sum() / total) if total > 0 else 0.0


def _roll(y: np.ndarray, axes, cells) -> np.ndarray:
    return np.roll(y, cells, axis=axes)


def _interior(y: np.ndarray, axes, margin: int) -> np.ndarray:
    """`y` without `margin` cells at both ends of `axes` (where padding, not aliasing, decides)."""
    index = [slice(None)] * y.ndim
    for a in axes:
        if y.shape[a] > 2 * margin:
            index[a] = slice(margin, y.shape[a] - margin)
    return y[tuple(index)]


def probe(path: str | os.PathLike, x: np.ndarray, margin: int = 2, progress: Progress | None = None) -> list[SiteProbe]:
    """Probe every site of the model at `path` on float NCHW inputs `x`.

    Shift errors leave out `margin` cells at each border of the site's output: the inputs are shifted
    circularly, and there the model's padding, not aliasing, decides (two cells: the rolled reference
    reads one cell further).
    """
    model = model_io.load(path)
    taps = _taps_for(model)
    g = model.graph
    extra = []
    for t in taps:
        for v in (t.pre, t.out):
            if v not in g.outputs and v not in extra:
                v.dtype = v.dtype or ir.DataType.FLOAT
                if not v.is_graph_input():  # an input keeps its declared shape (a fixed batch stays fixed)
                    v.shape = None
                extra.append(v)
    g.outputs.extend(extra)
    names = [v.name for v in g.outputs]
    with tempfile.TemporaryDirectory() as tmp:
        probe_path = Path(tmp) / "probe.onnx"
        # The copy lives elsewhere: weights the model keeps in external files go along in memory.
        ir.save(ir.external_data.load_to_model(model), probe_path)
        with OnnxRuntimeRunner(probe_path) as runner:

            def run(inputs):  # batches of 32, or of the model's fixed batch size
                outs = [runner.run({runner.input_names[0]: inputs[i : i + 32]}) for i in range(0, len(inputs), 32)]
                return {n: np.concatenate([o[j] for o in outs]) for j, n in enumerate(names)}

            return _measure(run, taps, x, margin, progress)


@dataclass
class _Named:
    name: str
    kind: str = ""


def probe_module(module, x: np.ndarray, margin: int = 2, progress: Progress | None = None) -> list[SiteProbe]:
    """`probe` for a PyTorch model (the original as a baseline): its sites are the modules the twin
    finds (strided convs and pools, strided-slice modules), read through forward hooks: the module's
    input is the tensor that gets subsampled, its output the site's output (a strided conv's: the
    BatchNorm after it, which an exported graph folds into the conv)."""
    module = module.eval()
    norms = conv_to_norm(module, torch.from_numpy(np.ascontiguousarray(x[:2], np.float32)))
    taps, modules = [], {}
    for path, site, kind, strides, channels_last in module_sites(module):
        if channels_last:
            continue  # a patch merge: its map is channels-last, the probe reads NCHW
        axes = tuple(2 + i for i, s in enumerate(strides) if s > 1)
        stride = tuple(s for s in strides if s > 1)
        taps.append(_Taps(_Named(path, kind), _Named(f"{path}:in"), _Named(f"{path}:out"), axes, stride, axes, None))
        modules[path] = site

    def run(inputs):
        seen: dict[str, list] = {}

        def keep(path: str, which: str):
            def hook(_module, inputs, output) -> None:  # a forward hook must return None
                if which in ("in", "both"):
                    seen.setdefault(f"{path}:in", []).append(inputs[0])
                if which in ("out", "both"):
                    seen.setdefault(f"{path}:out", []).append(output)

            return hook

        hooks = []
        for p, m in modules.items():
            norm = norms.get(m)
            hooks.append((m, keep(p, "in" if norm is not None else "both")))
            if norm is not None:
                hooks.append((norm, keep(p, "out")))
        for i in range(0, len(inputs), 32):
            run_with_hooks(module, torch.from_numpy(np.ascontiguousarray(inputs[i : i + 32], np.float32)), hooks)
        return {k: torch.cat(v).numpy() for k, v in seen.items()}

    return _measure(run, taps, x, margin, progress)


def _measure(run, taps: list[_Taps], x: np.ndarray, margin: int, progress: Progress | None) -> list[SiteProbe]:
    """The three figures per site, from `run(inputs) -> {tensor name: array}` over the batch; `progress`
    receives `Advance("sites probed", ...)` after each site."""
    advance = counter(progress, "sites probed", len(taps))
    base = run(x)
    shifted: dict[tuple, dict] = {}
    results = []
    h, w = x.shape[2], x.shape[3]
    for i, t in enumerate(taps):
        y = base[t.out.name]
        sizes = [y.shape[a] for a in t.out_axes]
        cumulative = None
        eq = sub = None
        spatial = (h, w)[-len(t.out_axes) :] if len(t.out_axes) <= 2 else None
        if spatial and all(s and n % s == 0 for n, s in zip(spatial, sizes)):
            cumulative = [n // s for n, s in zip(spatial, sizes)]
            key = tuple(cumulative)
            in_axes = (2, 3)[-len(cumulative) :]
            if key not in shifted:
                shifted[key] = run(np.roll(x, key, axis=in_axes))

            def inner(a, axes=t.out_axes):
                return _interior(a, axes, margin)

            moved = shifted[key][t.out.name]
            expected = _roll(y, t.out_axes, [1] * len(t.out_axes))
            norm = np.linalg.norm(inner(y)) or 1.0
            eq = float(np.linalg.norm(inner(moved - expected)) / norm)
            one = (1,) * len(cumulative)
            if one not in shifted:
                shifted[one] = run(np.roll(x, one, axis=in_axes))
            predicted = np.zeros_like(y, dtype=np.float64)
            for corner in np.ndindex(*(2,) * len(cumulative)):
                weight = np.prod([(1 / c) if k else (1 - 1 / c) for k, c in zip(corner, cumulative)])
                predicted += weight * _roll(y, t.out_axes, list(corner))
            sub = float(np.linalg.norm(inner(shifted[one][t.out.name] - predicted)) / norm)
        results.append(
            SiteProbe(
                i,
                t.site.name,
                t.site.kind,
                list(t.strides),
                cumulative,
                _aliasing(base[t.pre.name], t.axes, t.strides, t.response),
                eq,
                sub,
            )
        )
        advance(1)
    return results


def table(results: dict[str, list[SiteProbe]], count: int, source: str):
    """The probes of each model (by name, the first the baseline) side by side, a row per site: a rich Table."""
    from rich.table import Table

    out = Table(title=f"aliasing per site on {count} images from {source}", title_justify="left")
    for column in (
        "#",
        "site",
        "kind",
        "stride",
        "cum. stride",
        *(f"{Path(m).name}: alias % / equiv. / 1-px" for m in results),
    ):
        out.add_column(column)
    base = next(iter(results.values()))
    for i, p in enumerate(base):
        cells = []
        for probes in results.values():
            q = probes[i] if i < len(probes) else None
            cells.append(
                "-"
                if q is None
                else f"{100 * q.aliasing:.1f} / {_num(q.equivariance_error)} / {_num(q.subpixel_error)}"
            )
        out.add_row(
            str(i),
            p.node,
            p.kind,
            "x".join(map(str, p.strides)),
            "x".join(map(str, p.cumulative_stride or [])) or "-",
            *cells,
        )
    return out


def payload(results: dict[str, list[SiteProbe]], count: int, source: str) -> dict:
    """The probes as `probe --report` writes them (schema aa-deploy.probe/1)."""
    return {
        "schema": "aa-deploy.probe/1",
        "images": source,
        "count": count,
        "models": {m: [p.as_dict() for p in probes] for m, probes in results.items()},
    }


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"
