"""pytest helpers for users' own release tests."""

from __future__ import annotations

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
