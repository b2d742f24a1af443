"""pytest helpers for users' own release tests."""

from __future__ import annotations

from dataclasses import fields

from aa_deploy.consistency import compare, gate, sides
from aa_deploy.converters.export import load_model
from aa_deploy.verification.comparator import ParityResult
from aa_deploy.verification.parity import verify


def summary(result: ParityResult) -> str:
    """A readable multi-line summary of a parity result."""
    lines = [f"{result.kind} of {result.model} on {result.backend} ({result.precision}) vs {result.reference}:"]
    for o in result.outputs:
        status = "ok" if o.passed else f"FAILED: {o.failure}"
        lines.append(
            f"  {o.name} {o.shape}: max abs {o.max_abs:.3g}, max rel {o.max_rel:.3g}, min cosine {o.cosine_min:.6f}, "
            f"top-1 agreement {o.top1_agreement} -> {status}"
        )
    return "\n".join(lines)


def assert_parity(model, reference, *args, **kwargs) -> ParityResult:
    """`aa_deploy.verify(...)` (same arguments) that fails the calling test with a readable summary."""
    result = verify(model, reference, *args, **kwargs)
    if not result.passed:
        raise AssertionError(summary(result))
    return result


def assert_consistent(models, *, require, reference: str | None = None, weights=None, **kwargs) -> list[gate.Outcome]:
    """Measure `models` (ONNX files; the first is the baseline unless `reference`, the PyTorch original
    by name, is given) as `aa-deploy consistency` does, and fail the calling test with every outcome
    when a requirement (`require`: texts such as 'consistency.lower>=0', 'top1>=-0.5') does not hold.
    `kwargs`: fields of `consistency.compare.Measurement` (protocol, passes, ...), of
    `consistency.compare.Images` (`images` for its source, labels, preprocess, limit) and of
    `consistency.sides.Models` (backend, provider, device, layout)."""
    requirements = [gate.parse(text) for text in ([require] if isinstance(require, str) else require)]
    ref = None if reference is None else (f"reference:{reference}", load_model(reference, weights)[0])
    if "images" in kwargs:
        kwargs["source"] = kwargs.pop("images")
    specs = {}
    for spec in (compare.Measurement, compare.Images, sides.Models):
        names = {f.name for f in fields(spec)} & set(kwargs)
        specs[spec] = {name: kwargs.pop(name) for name in names}
    if kwargs:
        raise TypeError(f"assert_consistent got unknown arguments: {', '.join(sorted(kwargs))}")
    chosen = sides.Models(tuple(map(str, models)), reference=ref, **specs[sides.Models])
    results, _ = sides.measure_models(
        chosen, compare.Measurement(**specs[compare.Measurement]), compare.Images(**specs[compare.Images])
    )
    outcomes = gate.check(requirements, results, next(iter(results)))
    if not all(o.passed for o in outcomes):
        raise AssertionError("shift-consistency requirements not met:\n" + "\n".join(f"  {o.line}" for o in outcomes))
    return outcomes
