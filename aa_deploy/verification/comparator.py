"""Comparing two runners' outputs on the same inputs: the deployed model against its reference.

The comparator knows no backend: both sides are `converters.interface.Runner`s, built by the caller
(`parity.verify`); it runs them batch by batch, compares every output (`compare`: max error against
the reference's scale, per-sample cosine, top-1/top-5 agreement for classifiers) and writes the
result as JSON or JUnit XML.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from rich.console import Group
from rich.table import Table

from aa_deploy.common.atomic import write_text
from aa_deploy.common.errors import InputError, SettingError
from aa_deploy.common.version import __version__
from aa_deploy.converters.interface import Runner

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


@dataclass(frozen=True)
class Check:
    """What a comparison checks: `parity` (fails beyond the tolerance) or `change` (how much the anti-aliasing
    moved the outputs; never fails), against `tolerance`, or else the default of `precision` (fp32, fp16,
    int8)."""

    kind: Literal["parity", "change"] = "parity"
    precision: str = "fp32"
    tolerance: Tolerance | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("parity", "change"):
            raise SettingError("kind", "must be parity or change", self.kind)
        if self.precision not in DEFAULT_TOLERANCE:
            raise SettingError("precision", f"must be one of {', '.join(DEFAULT_TOLERANCE)}", self.precision)

    @property
    def limits(self) -> Tolerance:
        return self.tolerance or DEFAULT_TOLERANCE[self.precision]


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

    def __rich__(self) -> Group:
        """The parity (or change) table, the inputs and a one-line verdict."""
        label = "change vs plain model" if self.kind == "change" else "parity"
        table = Table(
            title=f"{label}: {self.model} on {self.backend} ({self.precision}) vs {self.reference}"
            + (" twin" if self.reference_antialiased else ""),
            title_justify="left",
        )
        for column in ("output", "shape", "max abs", "max rel", "min cosine", "top-1 agree", "top-5 agree", "result"):
            table.add_column(column)
        for o in self.outputs:
            verdict = "changed" if self.kind == "change" else ("pass" if o.passed else f"FAIL: {o.failure}")
            table.add_row(
                o.name,
                "x".join(map(str, o.shape)),
                f"{o.max_abs:.3g}",
                f"{o.max_rel:.3g}",
                f"{o.cosine_min:.6f}",
                _pct(o.top1_agreement),
                _pct(o.top5_agreement),
                verdict,
            )
        lines = [f"inputs: {self.inputs.get('count')} x {self.inputs.get('shape')} from {self.inputs.get('source')}"]
        if self.kind == "change":
            lines.append("CHANGE (not a failure): how much the anti-aliasing moved the outputs")
        else:
            tol = self.tolerance
            lines.append(
                ("PASS" if self.passed else "FAIL")
                + f" (atol {tol['atol']:g}, rtol {tol['rtol']:g}, min top-1 {tol['min_top1']:g}, "
                f"min cosine {tol['min_cosine']:g})"
            )
        return Group(table, *lines)

    def write_json(self, path: str | os.PathLike) -> None:
        """The report, atomically."""
        write_text(path, json.dumps(self.as_dict(), indent=2) + "\n")

    def write_junit(self, path: str | os.PathLike) -> None:
        """A JUnit XML file with one test case per output, for CI systems."""
        failures = sum(not o.passed for o in self.outputs)
        suite = ET.Element(
            "testsuite", name=f"aa-deploy {self.kind}", tests=str(len(self.outputs)), failures=str(failures)
        )
        for o in self.outputs:
            case = ET.SubElement(suite, "testcase", classname=f"{self.kind}.{Path(self.model).name}", name=o.name)
            ET.SubElement(case, "system-out").text = (
                f"max_abs={o.max_abs:.3g} max_rel={o.max_rel:.3g} cosine_min={o.cosine_min:.6f} "
                f"top1={o.top1_agreement} top5={o.top5_agreement}"
            )
            if not o.passed:
                ET.SubElement(case, "failure", message=o.failure).text = o.failure
        write_text(path, ET.tostring(ET.ElementTree(suite).getroot(), encoding="unicode") + "\n")


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


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


def compare_runners(reference: Runner, deployed: Runner, inputs: np.ndarray, check: Check, batch: int = 32):
    """Run `inputs` through `deployed` and `reference`, batch by batch, and compare each output
    (`OutputParity`, named by the deployed side's outputs)."""
    name = deployed.input_names[0]
    got_parts, ref_parts = [], []
    for i in range(0, len(inputs), batch):
        feeds = {name: inputs[i : i + batch]}
        got_parts.append(deployed.run(feeds))
        ref_parts.append(reference.run(feeds))
    n_out = len(got_parts[0])
    if len(ref_parts[0]) != n_out:
        raise InputError(f"the model has {n_out} outputs, the reference {len(ref_parts[0])}")
    return [
        compare(
            deployed.output_names[j],
            np.concatenate([r[j] for r in ref_parts]),
            np.concatenate([g[j] for g in got_parts]),
            check.limits,
            check=check.kind == "parity",
        )
        for j in range(n_out)
    ]
