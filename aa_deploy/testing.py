"""pytest helpers for users' own release tests."""

from __future__ import annotations

from aa_deploy.consistency import compare, gate
from aa_deploy.converters.export import load_model
from aa_deploy.parity import ParityResult, verify


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


def assert_parity(model, reference, **kwargs) -> ParityResult:
    """`aa_deploy.verify(...)` that fails the calling test with a readable summary."""
    result = verify(model, reference, **kwargs)
    if not result.passed:
        raise AssertionError(summary(result))
    return result


def assert_consistent(models, *, require, reference: str | None = None, weights=None, **kwargs) -> list[gate.Outcome]:
    """Measure `models` (ONNX files; the first is the baseline unless `reference`, the PyTorch original
    by name, is given) as `aa-deploy consistency` does, and fail the calling test with every outcome
    when a requirement (`require`: texts such as 'consistency.lower>=0', 'top1>=-0.5') does not hold.
    `kwargs` go to `consistency.compare.compare` (images, labels, protocol, passes, preprocess, ...)."""
    requirements = [gate.parse(text) for text in ([require] if isinstance(require, str) else require)]
    ref = None if reference is None else (f"reference:{reference}", load_model(reference, weights)[0])
    results, _ = compare.compare(list(map(str, models)), reference=ref, **kwargs)
    outcomes = gate.check(requirements, results, next(iter(results)))
    if not all(o.passed for o in outcomes):
        raise AssertionError("shift-consistency requirements not met:\n" + "\n".join(f"  {o.line}" for o in outcomes))
    return outcomes
