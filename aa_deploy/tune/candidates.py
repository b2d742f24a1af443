"""What `tune` tries: the original, dense sampling at each number of levels the graph accepts (every phase,
and the diagonal phases only), and the blur recipes that won on some model (docs/results.md), cheapest
first; each with its multiply-adds. The refit alone is tried only where named: it won with calibration
images of another kind than the served ones (crops of photos for a CIFAR model), and tune calibrates on
the kind it selects on, where distillation is the recipe."""

from __future__ import annotations

from dataclasses import dataclass, replace

import onnx_ir as ir

from aa_deploy.calibration.calibrate import Training
from aa_deploy.common.errors import InputError
from aa_deploy.conversion.graph_pass import dense_costs, plan_cost
from aa_deploy.conversion.plan import Options

BLUR = Options()  # convert's defaults: triangle, auto, reflect


@dataclass(frozen=True)
class Candidate:
    """A configuration: how the original is converted (None: it is the original) and calibrated (None: not)."""

    name: str
    options: Options | None = None
    training: Training | None = None
    default: bool = True  # tried without being named


@dataclass(frozen=True)
class Costed:
    """A candidate with its multiply-adds against the original's, or why the graph refuses it."""

    candidate: Candidate
    macs_ratio: float | None
    refused: str | None = None


def recipes(seed: int) -> list[Candidate]:
    """The blur recipes, in the order they cost to calibrate: the layer-by-layer refit alone (the best
    recipe from photo crops on the CIFAR ResNets; only where named: on images of the served kind it gains
    about half what distillation does, and as one more candidate a lucky selection sample can pick it),
    then distillation (`calibrate`'s default, the best from in-domain images), then the blur with the last
    level sampled densely, distilled (the best random-crop figure on the CIFAR ResNets at x2)."""
    refit = Training(method="reconstruct", rescale_after_blur=True, seed=seed)
    return [
        Candidate("blur + refit", BLUR, refit, default=False),
        Candidate("blur + calibrate", BLUR, Training(seed=seed)),
        Candidate("blur + dense-1 + calibrate", replace(BLUR, dense_last=1), Training(seed=seed)),
    ]


def _costed(model: ir.Model, candidate: Candidate) -> Costed:
    try:
        return Costed(candidate, plan_cost(model, candidate.options).ratio)
    except InputError as e:
        return Costed(candidate, None, str(e))


def space(model: ir.Model, seed: int = 0) -> list[Costed]:
    """Every candidate for `model`, the original first, then the ones without calibration (dense-N and its
    diagonal phases, cheapest first), then the calibrated recipes; a candidate the graph refuses carries
    the one-line reason."""
    sampled = []
    for dense in dense_costs(model, replace(BLUR, filter="none")):
        options = replace(BLUR, filter="none", dense_last=dense.n)
        sampled.append(
            Costed(Candidate(f"dense-{dense.n}", options), dense.cost.ratio if dense.cost else None, dense.refused)
        )
        if dense.cost is not None:
            diagonal = Candidate(f"dense-{dense.n}/diagonal", replace(options, phases="diagonal"))
            sampled.append(_costed(model, diagonal))
    sampled.sort(key=lambda c: (c.macs_ratio is None, c.macs_ratio or 0.0))
    return [Costed(Candidate("original"), 1.0), *sampled, *(_costed(model, c) for c in recipes(seed))]
