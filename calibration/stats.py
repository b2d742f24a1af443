"""`stats` calibration: conv by conv in graph order, rescale each conv's weights and bias so its
per-channel output mean/std on unlabeled images match the original model's at the same conv.

No gradients. A conv is matched to the teacher by its output tensor name, which conversion keeps.
A blurpool conv runs at stride 1 and the blur after it subsamples: the blur's output is the
counterpart of the teacher's conv output, so that is where its statistics are read; the bias is the
blur's in the Conv form, the conv's own in the pooled form (both commute with the blur).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aa_deploy.calibration.frontier import Frontier
from aa_deploy.calibration.matching import counterparts, trainable_convs
from aa_deploy.common.inserted import blur_after
from aa_deploy.common.progress import Progress, counter
from aa_deploy.converters.bridge import OnnxModule


@dataclass
class ConvTarget:
    """A trainable Conv of the student and the tensor that carries its output."""

    node: str
    output: str  # the student tensor whose statistics are matched
    own_output: str  # the conv's own output in the student (its place in the student graph)
    teacher_output: str  # the counterpart of the conv's output in the teacher (`matching.counterparts`)
    weight: str
    bias: str | None
    followed_by_blur: bool


def conv_targets(student: OnnxModule, teacher: OnnxModule, names: dict[str, str] | None = None) -> list[ConvTarget]:
    """Trainable student Convs whose output has a counterpart in the teacher (`names`, default
    `matching.counterparts`), in graph order."""
    names = counterparts(student, teacher).names if names is None else names
    trainable = student.trainable()
    targets = []
    for node in trainable_convs(student):
        name = node.outputs[0].name
        if name not in names:
            continue
        # A blurpool conv: the blur's output is the stride-s counterpart (a pre blur after a conv is not).
        carrier = (blur_after(node) if node.name in student.blurpool_nodes else None) or node
        holder = carrier if carrier.op_type == "Conv" and len(carrier.inputs) > 2 else node
        bias = holder.inputs[2].name if len(holder.inputs) > 2 and holder.inputs[2] is not None else None
        targets.append(
            ConvTarget(
                node.name,
                carrier.outputs[0].name,
                name,
                names[name],
                node.inputs[1].name,
                bias if bias in trainable else None,
                carrier is not node,
            )
        )
    return targets


@torch.no_grad()
def moments(source: Frontier, names: set[str], commit_until: int | None = None) -> dict[str, tuple]:
    """Per-channel mean/std of the named tensors over all of the frontier's images, batch by batch
    (the frontier's held point does not pass node `commit_until`)."""
    sums: dict[str, list] = {}
    for _, captured in source.tensors(names, commit_until):
        for name, t in captured.items():
            t = t.double().transpose(0, 1).reshape(t.shape[1], -1)
            s = sums.setdefault(name, [0.0, 0.0, 0])
            s[0] = s[0] + t.sum(dim=1)
            s[1] = s[1] + (t * t).sum(dim=1)
            s[2] += t.shape[1]
    out = {}
    for name, (s1, s2, n) in sums.items():
        mean = s1 / n
        var = (s2 / n - mean * mean).clamp_min(0) * n / max(n - 1, 1)
        out[name] = (mean.float(), var.sqrt().float())
    return out


@torch.no_grad()
def calibrate_stats(
    student: OnnxModule,
    teacher: OnnxModule,
    x: torch.Tensor,
    batch: int = 250,
    progress: Progress | None = None,
    names: dict[str, str] | None = None,
) -> list[dict]:
    """Rescale every target conv of `student` in place, in graph order (each node run once per image:
    `Frontier`); returns one record per conv. `names`: as `conv_targets` takes them."""
    targets = conv_targets(student, teacher, names)
    reference = moments(Frontier(teacher, x, batch), {t.teacher_output for t in targets})
    params = student.trainable()
    held = Frontier(student, x, batch)
    report = []
    advance = counter(progress, "rescaling convs (closed-form start)", len(targets))
    for target in targets:
        advance(1)
        position = student.producers[target.own_output]  # the conv's place in the student graph
        scale = rescale(params, target, moments(held, {target.output}, position)[target.output],
                        reference[target.teacher_output])  # fmt: skip
        report.append({"node": target.node, "scale_mean": float(scale.mean()), "shifted": target.bias is not None})
    return report


@torch.no_grad()
def rescale(params: dict, target: ConvTarget, student_moments: tuple, teacher_moments: tuple) -> torch.Tensor:
    """Scale and shift one conv's output channels (weights and bias in `params`, in place) so that the
    student's per-channel mean/std become the teacher's; returns the scales."""
    (mean_s, std_s), (mean_t, std_t) = student_moments, teacher_moments
    scale = torch.where(std_s > 1e-8, std_t / std_s.clamp_min(1e-8), torch.ones_like(std_s))
    w = params[target.weight]
    w.mul_(scale.reshape(-1, *([1] * (w.dim() - 1))))
    if target.bias is not None:
        params[target.bias].mul_(scale).add_(mean_t - scale * mean_s)
    return scale
