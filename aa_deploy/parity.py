"""Numerical parity of an ONNX model on a backend against its PyTorch reference (plain or twin).

Backends and the reference are runners (`run(feeds) -> outputs`), so the comparison knows nothing
about either side. A parity check can fail; a `change` check (converted model against the plain
original) only reports how much the anti-aliasing moved the outputs.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from aa_deploy import bundled, model_io
from aa_deploy.atomic import write_text
from aa_deploy.converters.export import load_model
from aa_deploy.converters.pytorch import TorchRunner
from aa_deploy.converters.runners import make_runner
from aa_deploy.converters.tensorrt import Sidecar, require_tensorrt
from aa_deploy.errors import InputError
from aa_deploy.images import load_folder, normalize, preprocess_for
from aa_deploy.input_format import from_dims
from aa_deploy.plan import Options
from aa_deploy.torch import antialias_with
from aa_deploy.twin_weights import load_folded_weights
from aa_deploy.version import __version__

SCHEMA = "aa-deploy.parity/1"


@dataclass(frozen=True)
class Tolerance:
    """Pass when max|got - ref| <= atol + rtol * max|ref|, every sample's cosine similarity >= min_cosine
    and, for classifiers, top-1 agreement >= min_top1."""

    atol: float
    rtol: float
    min_top1: float
    min_cosine: float = 0.0


# INT8 moves logits elementwise by a good share of their scale (ResNet-20: 43 %) while keeping the
# decision (99 % top-1 agreement) and the direction (cosine >= 0.96): its gate is agreement and cosine.
DEFAULT_TOLERANCE = {
    "fp32": Tolerance(atol=1e-4, rtol=1e-4, min_top1=0.99, min_cosine=0.9999),
    "fp16": Tolerance(atol=1e-2, rtol=1e-2, min_top1=0.95, min_cosine=0.999),
    "int8": Tolerance(atol=1.0, rtol=0.6, min_top1=0.9, min_cosine=0.95),
}


@dataclass
class OutputParity:
    """Agreement of one output."""

    name: str
    shape: list[int]
    max_abs: float
    max_rel: float  # max|got - ref| / max|ref|
    cosine_min: float  # lowest per-sample cosine similarity
    top1_agreement: float | None  # classifiers (2-D outputs) only
    top5_agreement: float | None  # share of samples whose reference top-1 is in the top-5
    passed: bool
    failure: str = ""


@dataclass
class ParityResult:
    """The whole check, as the JSON report holds it."""

    kind: str  # parity | change
    passed: bool
    model: str
    reference: str
    reference_antialiased: dict | None
    backend: str
    precision: str
    tolerance: dict
    inputs: dict
    outputs: list[OutputParity] = field(default_factory=list)
    schema: str = SCHEMA
    aa_deploy_version: str = __version__

    def as_dict(self) -> dict:
        return asdict(self)


def compare(name: str, ref: np.ndarray, got: np.ndarray, tol: Tolerance, check: bool = True) -> OutputParity:
    """Metrics of `got` against `ref` for one output, and whether they pass `tol`."""
    if ref.shape != got.shape:
        return OutputParity(
            name,
            list(got.shape),
            float("inf"),
            float("inf"),
            -1.0,
            None,
            None,
            False,
            f"shape {tuple(got.shape)} != reference {tuple(ref.shape)}",
        )
    ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
    diff = np.abs(got64 - ref64)
    scale = float(np.abs(ref64).max()) if ref.size else 0.0
    max_abs = float(diff.max()) if diff.size else 0.0
    flat_r, flat_g = ref64.reshape(len(ref64), -1), got64.reshape(len(got64), -1)
    norms = np.linalg.norm(flat_r, axis=1) * np.linalg.norm(flat_g, axis=1)
    cos = np.where(norms > 0, (flat_r * flat_g).sum(axis=1) / np.maximum(norms, 1e-300), 1.0)
    top1 = top5 = None
    if ref.ndim == 2 and ref.shape[1] > 1:
        r1 = ref.argmax(axis=1)
        top1 = float((got.argmax(axis=1) == r1).mean())
        k = min(5, ref.shape[1])
        top5 = float((np.argsort(-got, axis=1)[:, :k] == r1[:, None]).any(axis=1).mean())
    failures = []
    if not np.isfinite(ref64).all():  # NaN compares false with every bound below: it must fail here
        failures.append("the reference has non-finite values")
    if not np.isfinite(got64).all():
        failures.append("non-finite values")
    if max_abs > tol.atol + tol.rtol * scale:
        failures.append(f"max abs error {max_abs:.3g} > {tol.atol:g} + {tol.rtol:g} x {scale:.3g}")
    if float(cos.min()) < tol.min_cosine:
        failures.append(f"cosine similarity {float(cos.min()):.4f} < {tol.min_cosine:g}")
    if top1 is not None and top1 < tol.min_top1:
        failures.append(f"top-1 agreement {top1:.3f} < {tol.min_top1:g}")
    return OutputParity(
        name,
        list(got.shape),
        max_abs,
        max_abs / scale if scale > 0 else max_abs,
        float(cos.min()),
        top1,
        top5,
        passed=not failures or not check,
        failure="; ".join(failures),
    )


def random_inputs(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Deterministic standard-normal inputs (float32)."""
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def concrete_shape(dims: list, batch: int, input_shape: tuple[int, ...] | None) -> tuple[int, ...]:
    """A runnable input shape: `batch` for the first axis, `input_shape` (C, H, W...) where given or dynamic."""
    if input_shape is not None:
        if len(input_shape) != len(dims) - 1:
            raise InputError(
                f"--input-shape has {len(input_shape)} dims; the model's input has {len(dims) - 1} after the batch"
            )
        return (batch, *input_shape)
    rest = dims[1:]
    if any(not isinstance(d, int) or d <= 0 for d in rest):
        raise InputError(f"the model's input has dynamic dims {dims}: give --input-shape C x H x W")
    return (batch, *rest)


def reference_options(path: str | os.PathLike, antialiased: bool | None, override: Options | None) -> Options | None:
    """The anti-aliasing the reference needs: the user's, or the one recorded in the model's metadata."""
    if antialiased is False:
        return None
    if override is not None:
        return override
    meta = model_io.read_metadata(model_io.load_proto(path))
    if "options" in meta:
        return Options(**meta["options"])
    if antialiased:
        raise InputError(f"{path}: --antialiased needs filter options, and the model records none (not converted?)")
    return None


def compare_runners(
    model: str | os.PathLike,
    reference,
    runner,
    *,
    inputs: np.ndarray,
    kind: str = "parity",
    precision: str = "fp32",
    tolerance: Tolerance | None = None,
    reference_name: str = "",
    reference_options: Options | None = None,
    backend: str = "onnxruntime:cpu",
    inputs_info: dict | None = None,
    batch: int = 32,
) -> ParityResult:
    """Run `inputs` through `runner` (the deployed model) and `reference`, batch by batch, and compare."""
    if precision not in DEFAULT_TOLERANCE:
        raise InputError(f"precision must be one of {', '.join(DEFAULT_TOLERANCE)}, not {precision!r}")
    tol = tolerance or DEFAULT_TOLERANCE[precision]
    name = runner.input_names[0]
    got_parts, ref_parts = [], []
    for i in range(0, len(inputs), batch):
        feeds = {name: inputs[i : i + batch]}
        got_parts.append(runner.run(feeds))
        ref_parts.append(reference.run(feeds))
    n_out = len(got_parts[0])
    if len(ref_parts[0]) != n_out:
        raise InputError(f"the model has {n_out} outputs, the reference {len(ref_parts[0])}")
    outputs = [
        compare(
            runner.output_names[j],
            np.concatenate([r[j] for r in ref_parts]),
            np.concatenate([g[j] for g in got_parts]),
            tol,
            check=kind == "parity",
        )
        for j in range(n_out)
    ]
    return ParityResult(
        kind=kind,
        passed=all(o.passed for o in outputs),
        model=str(model),
        reference=reference_name,
        reference_antialiased=reference_options.as_dict() if reference_options else None,
        backend=backend,
        precision=precision,
        tolerance=asdict(tol),
        inputs=inputs_info or {"count": len(inputs), "shape": list(inputs.shape[1:])},
        outputs=outputs,
    )


def write_json(result: ParityResult, path: str | os.PathLike) -> None:
    """The report, atomically."""
    import json

    write_text(path, json.dumps(result.as_dict(), indent=2) + "\n")


def write_junit(result: ParityResult, path: str | os.PathLike) -> None:
    """A JUnit XML file with one test case per output, for CI systems."""
    import xml.etree.ElementTree as ET

    failures = sum(not o.passed for o in result.outputs)
    suite = ET.Element(
        "testsuite", name=f"aa-deploy {result.kind}", tests=str(len(result.outputs)), failures=str(failures)
    )
    for o in result.outputs:
        case = ET.SubElement(suite, "testcase", classname=f"{result.kind}.{Path(result.model).name}", name=o.name)
        ET.SubElement(case, "system-out").text = (
            f"max_abs={o.max_abs:.3g} max_rel={o.max_rel:.3g} cosine_min={o.cosine_min:.6f} "
            f"top1={o.top1_agreement} top5={o.top5_agreement}"
        )
        if not o.passed:
            ET.SubElement(case, "failure", message=o.failure).text = o.failure
    write_text(path, ET.tostring(ET.ElementTree(suite).getroot(), encoding="unicode") + "\n")


def make_inputs(
    model: str | os.PathLike,
    *,
    images: str | None = None,
    preprocess=None,
    count: int = 8,
    seed: int = 0,
    input_shape: tuple[int, ...] | None = None,
    layout: str | None = None,
) -> tuple[np.ndarray, dict]:
    """Inputs for a check: deterministic random, the bundled CIFAR test images, or an image folder (fed
    as the model's input takes them: layout, channels, float type; `layout` where the graph cannot say)."""
    _, dims, dtype = model_io.input_spec(model, with_type=True)
    if images is None:
        shape = concrete_shape(dims, count, input_shape)
        return random_inputs(shape, seed), {
            "source": "random normal",
            "seed": seed,
            "count": count,
            "shape": list(shape[1:]),
        }
    fmt = from_dims(dims, dtype, layout, str(model))
    if images == "bundled:cifar10":
        x = bundled.cifar_feed(fmt)(bundled.cifar_test_images()[0])
        return x, {"source": "bundled CIFAR-10 test images", "count": len(x), "shape": list(x.shape[1:])}
    preprocess = preprocess_for(fmt, preprocess, str(model))
    raw, files = load_folder(images, preprocess, limit=count if count > 0 else None)
    x = normalize(raw, preprocess, fmt)
    if any(isinstance(d, int) and d > 0 and d != k for d, k in zip(dims[1:], x.shape[1:], strict=True)):
        raise InputError(f"preprocessed images are {list(x.shape[1:])}, the model takes {dims[1:]}: check --size")
    info = {"source": str(images), "count": len(x), "shape": list(x.shape[1:]), "preprocess": preprocess.as_dict()}
    return x, info


def verify(
    model: str | os.PathLike,
    reference,
    *,
    antialiased: bool | None = None,
    options: Options | None = None,
    change: bool = False,
    backend: str = "onnxruntime",
    provider: str = "cpu",
    precision: str = "fp32",
    tolerance: Tolerance | None = None,
    images: str | None = None,
    preprocess=None,
    count: int = 8,
    seed: int = 0,
    input_shape: tuple[int, ...] | None = None,
    weights: str | os.PathLike | None = None,
    layout: str | None = None,
) -> ParityResult:
    """Check an ONNX model on a backend against its PyTorch reference.

    `reference` is an nn.Module or a model name (timm:..., torchvision:..., aa:...). The reference
    is the twin with the anti-aliasing recorded in the model's metadata (or `options`), unless
    `antialiased` is False. With `change`, the model is compared with the *plain* reference and
    the result reports how much the anti-aliasing changed the outputs; it never fails.
    """
    path = Path(model)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    graph_path = path
    if backend == "tensorrt":  # an engine: its ONNX source (from the sidecar) has the metadata and input spec
        require_tensorrt()
        graph_path = Sidecar.read(path).onnx_file(path)
    reference_name = reference if isinstance(reference, str) else type(reference).__name__
    if isinstance(reference, str):
        reference, _ = load_model(reference, weights)
    twin_options = None if change else reference_options(graph_path, antialiased, options)
    inputs, info = make_inputs(
        graph_path, images=images, preprocess=preprocess, count=count, seed=seed, input_shape=input_shape, layout=layout
    )
    module = reference
    if twin_options is not None:
        import torch

        sample = torch.from_numpy(np.asarray(inputs[:1], np.float32))  # dense sampling reads levels from sizes
        module = antialias_with(reference, twin_options, sample=sample)[0]
    graph_model = model_io.load(graph_path)
    if not change and twin_options is not None and "calibration" in model_io.read_metadata(graph_model):
        # The file that ships is calibrated: its reference is the twin holding the calibrated weights,
        # read from the model itself (the BatchNorm-folded values go back into the twin's convs).
        import torch

        placed = load_folded_weights(module, graph_model, torch.from_numpy(np.asarray(inputs[:2], np.float32)))
        info = info | {"calibrated_weights": placed}
    runner = make_runner(path, backend, provider)
    return compare_runners(
        path,
        TorchRunner(module),
        runner,
        inputs=inputs,
        kind="change" if change else "parity",
        precision=precision,
        tolerance=tolerance,
        reference_name=reference_name,
        reference_options=twin_options,
        backend=f"{backend}:{provider}" if backend == "onnxruntime" else backend,
        inputs_info=info,
    )
