"""The consistency gate: requirements on a model's paired differences from the baseline.

    --require 'top1>=-0.5'  --require 'consistency>=0'  --require 'consistency.lower>=0'

A requirement names a metric, optionally a bound of its paired 95 % interval (`.lower` / `.upper`;
without one, the point estimate), a comparison and a number of percentage points. The metrics:
`top1` (accuracy over the protocol's views, labels needed), `consistency` (the protocol's own figure;
its name, e.g. `random-crop` or `one-pixel`, is an alias) and `stability` (the same figure where
the output is not a classifier's: the cosine of two views' outputs). Differences are the model minus
the baseline over the same images and views, intervals a bootstrap over images
(`consistency.paired`): a bound is the statement "the images support at least this".
"""

from __future__ import annotations

import operator
import re
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass

import numpy as np

from aa_deploy.common.atomic import write_text
from aa_deploy.common.errors import InputError
from aa_deploy.consistency.paired import bootstrap_ci
from aa_deploy.consistency.protocols import PROTOCOLS, ConsistencyResult

COMPARISONS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}
METRICS = ("top1", "consistency", "stability", *PROTOCOLS)
_FORM = re.compile(r"^\s*([a-z0-9-]+)(?:\.(lower|upper))?\s*(>=|<=|>|<)\s*([-+]?\d+(?:\.\d*)?|[-+]?\.\d+)\s*$")


@dataclass(frozen=True)
class Requirement:
    """`metric[.bound] op value`: the model's paired difference from the baseline, in points."""

    metric: str
    bound: str  # "point", "lower" or "upper"
    op: str
    value: float

    @property
    def text(self) -> str:
        bound = "" if self.bound == "point" else f".{self.bound}"
        return f"{self.metric}{bound}{self.op}{self.value:g}"


@dataclass(frozen=True)
class Outcome:
    """One requirement on one model: the difference observed (the bound asked for), and whether it held."""

    requirement: str
    model: str
    observed: float  # percentage points
    interval: tuple[float, float]  # the paired 95 % interval, points
    passed: bool

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def line(self) -> str:
        verdict = "pass" if self.passed else "FAIL"
        lo, hi = self.interval
        return f"{verdict}: {self.model}: {self.requirement} (observed {self.observed:+.2f}; 95 % CI {lo:+.2f} to {hi:+.2f})"


def parse(text: str) -> Requirement:
    """A requirement from its text, or a one-line InputError saying the form."""
    match = _FORM.match(text.lower())
    if match is None or match.group(1) not in METRICS:
        raise InputError(
            f"--require {text!r}: write METRIC[.lower|.upper]OP POINTS, e.g. 'consistency.lower>=0' or 'top1>=-0.5' "
            f"(metrics: {', '.join(METRICS)})"
        )
    metric, bound, op, value = match.groups()
    return Requirement(metric, bound or "point", op, float(value))


def _paired(base: np.ndarray, other: np.ndarray) -> tuple[float, tuple[float, float]]:
    diff = np.asarray(other, np.float64) - np.asarray(base, np.float64)
    return float(diff.mean()), bootstrap_ci(diff)


def evaluate(requirement: Requirement, name: str, base: ConsistencyResult, other: ConsistencyResult) -> Outcome:
    """Whether `other` (model `name`) meets `requirement` against `base`, measured on the same views."""
    if requirement.metric == "top1":
        if not base.per_image_correct or not other.per_image_correct:
            raise InputError(f"--require {requirement.text}: top-1 needs labels (--labels, or a folder per class)")
        delta, ci = _paired(base.per_image_correct, other.per_image_correct)
    else:
        kind = "stability" if other.metric != "top-1 agreement" else "consistency"
        if requirement.metric not in (kind, other.protocol, "consistency"):
            raise InputError(
                f"--require {requirement.text}: this run measures {other.protocol} {kind}; "
                f"require 'consistency' or '{other.protocol}'"
            )
        delta, ci = _paired(base.per_image, other.per_image)
    return judge(requirement, name, delta, ci)


def judge(requirement: Requirement, name: str, delta: float, ci: tuple[float, float]) -> Outcome:
    """Whether a paired difference `delta` (shares, with its 95 % interval `ci`) of model `name` meets
    `requirement`, whose metric the caller has matched to it."""
    observed = {"point": delta, "lower": ci[0], "upper": ci[1]}[requirement.bound]
    points = 100 * observed
    passed = COMPARISONS[requirement.op](round(points, 9), requirement.value)
    return Outcome(requirement.text, name, points, (100 * ci[0], 100 * ci[1]), bool(passed))


def check(requirements: list[Requirement], results: dict[str, ConsistencyResult], baseline: str) -> list[Outcome]:
    """Every requirement on every model but the baseline, in model order."""
    base = results[baseline]
    return [evaluate(r, name, base, res) for name, res in results.items() if name != baseline for r in requirements]


def write_junit(outcomes: list[Outcome], path, suite_name: str = "aa-deploy consistency") -> None:
    """A JUnit XML file with one test case per requirement per model, for CI systems."""
    suite = ET.Element(
        "testsuite", name=suite_name, tests=str(len(outcomes)), failures=str(sum(not o.passed for o in outcomes))
    )
    for o in outcomes:
        case = ET.SubElement(suite, "testcase", classname=f"consistency.{o.model}", name=o.requirement)
        ET.SubElement(case, "system-out").text = o.line
        if not o.passed:
            ET.SubElement(case, "failure", message=o.line).text = o.line
    write_text(path, ET.tostring(suite, encoding="unicode") + "\n")


def report(protocol: str, source: str, results: dict, versus: dict, costs: dict, outcomes: list) -> dict:
    """What `consistency --report` writes (schema aa-deploy.consistency/3): each model's result, its paired
    difference from the first (the baseline), the costs, and each requirement's outcome."""
    return {
        "schema": "aa-deploy.consistency/3",
        "protocol": protocol,
        "images": source,
        "baseline": next(iter(results)),
        "models": {name: r.as_dict() for name, r in results.items()},
        "versus_first": {name: d.as_dict() for name, d in versus.items()},
        "cost": costs,
        "requirements": [o.as_dict() for o in outcomes],
        "passed": all(o.passed for o in outcomes),
    }
