"""`reconstruct` calibration: conv by conv in graph order, refit each conv's weights and bias by
ridge regression so that, fed the *student's* own input at that conv, it reproduces the *teacher's*
output of the same conv on unlabeled images (or, for a conv whose output is added to a residual
branch, the teacher's sum: the conv then also corrects the other branch).

No gradients, no learning rate. A conv's output is linear in its weights, so the best weights for
one conv are a least-squares solution over its unfolded input patches (im2col): per group, the
normal equations (X'X + lam I) w = X'y + lam w0, accumulated batch by batch and solved in float64.
Going in graph order, each conv corrects what the blurs and the convs before it changed, which is
how post-training quantization recovers accuracy from a few hundred unlabeled images (layer-wise
reconstruction, e.g. AdaRound / GPTQ); `stats` only rescales each output channel.

The ridge pulls towards the conv's current weights (`lam` = `ridge` x the mean diagonal of X'X), so
a conv whose patches carry little information stays close to where it was. Positions are
subsampled at random to bound the work per conv (`MAX_FLOPS`). Convs this cannot refit in closed
form (a blurpool conv, whose output only exists after the blur; rank other than 2) get `stats`'
per-channel rescaling instead, and so do the spatial convs with `spatial=False` (distill's default
start, which refits the channel mixing only), and with `after_blur=False` the spatial convs that read
a blur's output: fit against the original's output of the same conv, such a kernel can sharpen itself
to undo the blur in front of it.

The teacher may also be a dense conversion of the original (`convert --dense-last N`): its maps after
the dense sites are larger than the student's, and each target is brought onto the student's grid as
the mean over the sampling phases around each position (`onto_grid`): the student is fit towards the
original averaged over shifts, block by block, instead of towards its aliased samples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aa_deploy.calibration.frontier import Frontier
from aa_deploy.calibration.matching import counterparts
from aa_deploy.calibration.stats import ConvTarget, conv_targets, moments, rescale
from aa_deploy.common import graph, inserted
from aa_deploy.common.errors import InputError
from aa_deploy.common.progress import Progress, counter
from aa_deploy.converters.bridge import OnnxModule

RIDGES = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # relative to the mean diagonal of X'X
MAX_FLOPS = 4e10  # multiply-adds spent on one conv's normal equations (positions are sampled to fit)
PATCH_BYTES = 256 << 20  # unfolded patches held at once


def _patches(node, x: torch.Tensor, groups: int, kernel: list[int]) -> torch.Tensor:
    """(N, groups, features, positions): the conv's input patches, one column per output position."""
    strides = graph.ints(node, "strides", [1, 1])
    dilations = graph.ints(node, "dilations", [1, 1])
    pads = graph.ints(node, "pads", [0, 0, 0, 0])
    if pads[:2] != pads[2:]:
        x = F.pad(x, [pads[1], pads[3], pads[0], pads[2]])
        pads = [0, 0, 0, 0]
    cols = F.unfold(x, kernel, dilation=dilations, padding=pads[:2], stride=strides)
    return cols.reshape(x.shape[0], groups, -1, cols.shape[-1])


def _out_size(node, x: torch.Tensor, kernel: list[int]) -> tuple[int, int]:
    """The conv's output height and width for input `x` (N, C, H, W)."""
    strides = graph.ints(node, "strides", [1, 1])
    dilations = graph.ints(node, "dilations", [1, 1])
    pads = graph.ints(node, "pads", [0, 0, 0, 0])
    return tuple(
        (x.shape[2 + a] + pads[a] + pads[2 + a] - dilations[a] * (kernel[a] - 1) - 1) // strides[a] + 1 for a in (0, 1)
    )


def onto_grid(y: torch.Tensor, size: tuple[int, int], name: str = "the teacher's tensor") -> torch.Tensor:
    """A densely sampled teacher's map (N, C, f*H.., f*W..) brought onto the student's (H, W) grid: the
    mean over the f x f sampling phases around each of the student's positions (a triangle of 2f - 1 taps
    per axis, every phase weighted 1/f on each; the map extended by whole periods of phases at its
    borders), taken at phase 0, where the original samples (docs/design.md, "Dense sampling"). A map of
    `size` already is returned as it is; one whose size is not a whole multiple of it is an InputError:
    the teacher is not a conversion of this model's original."""
    if tuple(y.shape[2:]) == tuple(size):
        return y
    factors = {-(-y.shape[2 + a] // size[a]) for a in (0, 1)}
    f = factors.pop() if len(factors) == 1 else 0
    if f < 2 or any(-(-y.shape[2 + a] // f) != size[a] or y.shape[2 + a] < f for a in (0, 1)):
        raise InputError(
            f"{name}: the model's tensor has {size[0]}x{size[1]} positions per channel and the teacher's "
            f"{y.shape[2]}x{y.shape[3]}; calibrate pairs tensors by name, so the model must be a conversion of this "
            "teacher (or the teacher a dense conversion of its original)"
        )
    tri = torch.cat([torch.arange(1, f + 1), torch.arange(f - 1, 0, -1)]).to(y.dtype) / (f * f)
    kernel = (tri[:, None] * tri[None, :]).to(y.device).expand(y.shape[1], 1, 2 * f - 1, 2 * f - 1)
    padded = y
    for axis in (2, 3):  # extended by a whole period of phases: position -d reads f - d, the same phase
        n = padded.shape[axis]
        padded = torch.cat([padded.narrow(axis, 1, f - 1), padded, padded.narrow(axis, n - f, f - 1)], axis)
    return F.conv2d(padded, kernel, stride=f, groups=y.shape[1])


def _refittable(node, weight: torch.Tensor, target: ConvTarget, spatial: bool, after_blur: bool) -> bool:
    pointwise = tuple(weight.shape[2:]) == (1, 1)
    return (
        not target.followed_by_blur
        and weight.dim() == 4
        and (spatial or pointwise)
        and (after_blur or pointwise or not inserted.reads_blurred(node.inputs[0]))
        and node.attributes.get_string("auto_pad", "NOTSET") in ("NOTSET", "")
    )


def _merge_after(node, names: dict[str, str]) -> tuple[str, str] | None:
    """(sum, other addend) when `node`'s output goes only into an Add with another computed tensor (a
    residual merge) whose output has a counterpart in the teacher (`names`: student -> teacher tensor; the
    sum returned is the teacher's): the conv is then fit so that the *sum* matches
    the teacher's, correcting what the other branch (a blurred shortcut, an earlier block) got wrong
    too, since everything downstream reads only the sum."""
    readers = list(node.outputs[0].consumers())
    if len(readers) != 1 or readers[0].op_type != "Add":
        return None
    add = readers[0]
    others = [v for v in add.inputs if v is not None and v is not node.outputs[0]]
    if len(others) != 1 or others[0].const_value is not None or add.outputs[0].name not in names:
        return None
    return names[add.outputs[0].name], others[0].name


class NormalEquations:
    """X'X, X'y and y'y of a ridge regression per group, accumulated in float64 batch by batch, in
    two folds (alternate images) so that the ridge can be chosen by cross-validation."""

    def __init__(self, groups: int, features: int, outs: int, device: torch.device) -> None:
        shape = dict(dtype=torch.float64, device=device)
        self.gram = torch.zeros(2, groups, features, features, **shape)
        self.cross = torch.zeros(2, groups, features, outs, **shape)
        self.sq = torch.zeros(2, groups, outs, **shape)
        self.count = [0, 0]

    def add(self, cols: torch.Tensor, y: torch.Tensor, fold: int = 0) -> None:
        """cols (groups, rows, features), y (groups, rows, outs): rows of one fold (0 or 1)."""
        cols, y = cols.double(), y.double()
        self.gram[fold] += cols.transpose(1, 2) @ cols
        self.cross[fold] += cols.transpose(1, 2) @ y
        self.sq[fold] += (y * y).sum(1)
        self.count[fold] += y.shape[1]

    @staticmethod
    def _fit(gram, cross, current, ridge):  # ridge: (groups,) relative to the mean diagonal
        lam = ridge.reshape(-1, 1, 1) * gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-12).reshape(-1, 1, 1)
        eye = torch.eye(gram.shape[-1], dtype=torch.float64, device=gram.device)
        return torch.linalg.solve(gram + lam * eye, cross + lam * current)

    @staticmethod
    def _sse(gram, cross, sq, w):  # (groups, outs)
        return sq - 2 * (w * cross).sum(1) + (w * (gram @ w)).sum(1)

    def solve(self, current: torch.Tensor, ridges: tuple[float, ...], intercept: bool) -> tuple[torch.Tensor, dict]:
        """The ridge solution pulled towards `current` (groups, features, outs), with the ridge of
        `ridges` that predicts each fold best from the other (per group), and what it leaves unexplained."""
        current = current.double()
        groups = self.gram.shape[1]
        ridge = torch.full((groups,), float(ridges[0]), dtype=torch.float64, device=self.gram.device)
        if len(ridges) > 1 and min(self.count) > 0:
            errors = []
            for r in ridges:
                r = torch.full_like(ridge, float(r))
                err = 0
                for a, b in ((0, 1), (1, 0)):
                    w = self._fit(self.gram[a], self.cross[a], current, r)
                    err = err + self._sse(self.gram[b], self.cross[b], self.sq[b], w).sum(1)
                errors.append(err)
            best = torch.stack(errors).argmin(0)
            ridge = torch.tensor(ridges, dtype=torch.float64, device=self.gram.device)[best]
        gram, cross, sq, count = self.gram.sum(0), self.cross.sum(0), self.sq.sum(0), sum(self.count)
        w = self._fit(gram, cross, current, ridge)
        mean = cross[:, -1, :] / count if intercept else 0.0
        # Over all outputs together: a near-constant output channel cannot inflate it past 1.
        spread = (sq - count * mean**2).sum().clamp_min(1e-12)
        unexplained = float(self._sse(gram, cross, sq, w).sum() / spread)
        return w, {"residual": unexplained, "ridge": float(ridge.median())}


def _with_ones(cols: torch.Tensor, intercept: bool) -> torch.Tensor:
    return torch.cat([cols, torch.ones_like(cols[..., :1])], dim=-1) if intercept else cols


@torch.no_grad()
def refit_conv(
    student: Frontier,
    teacher: Frontier,
    target: ConvTarget,
    node,
    position: int,
    ridges: tuple[float, ...] = RIDGES,
    generator: torch.Generator | None = None,
    names: dict[str, str] | None = None,
) -> dict:
    """Refit one conv (`node`, the graph node of `target`, at `position` in the student's graph) in
    place; returns the ridge chosen and the fraction of the teacher output's variance left unexplained.
    A conv that feeds a residual Add is fit against the teacher's sum minus the student's other addend
    (`_merge_after`)."""
    params = student.module.trainable()
    weight = params[target.weight]
    bias = params[target.bias] if target.bias is not None else None
    c_out, per_group, *kernel = weight.shape
    groups = node.attributes.get_int("group", 1)
    features = per_group * kernel[0] * kernel[1] + (bias is not None)
    outs = c_out // groups
    equations = NormalEquations(groups, features, outs, weight.device)
    budget = None
    names = {n: n for n in teacher.module.computed} if names is None else names
    merge = _merge_after(node, names)
    source = node.inputs[0].name
    # The conv's input (and the other addend, in the same pass of the student) and the teacher's target.
    wanted = (source,) if merge is None else (source, merge[1])
    pairs = zip(
        student.tensors(wanted, position), teacher.tensors([target.teacher_output if merge is None else merge[0]])
    )
    for (i, got), (_, want) in pairs:
        inputs = got[source]
        y_all = onto_grid(next(iter(want.values())), _out_size(node, inputs, kernel), target.teacher_output)
        y_all = y_all - (got[merge[1]] if merge is not None else 0)
        y_all = y_all.reshape(y_all.shape[0], groups, outs, -1)
        positions = y_all.shape[-1]
        if budget is None:  # positions per image, so that all images cost about MAX_FLOPS
            budget = max(1, min(positions, int(MAX_FLOPS / (groups * features * features * len(student)))))
        # Patches of a few images at a time: one image's can be tens of MB (float32, then sampled float64).
        step = max(1, PATCH_BYTES // (4 * groups * features * (positions + 2 * budget)))
        for j in range(0, len(inputs), step):
            cols = _patches(node, inputs[j : j + step], groups, kernel)  # `positions` columns: onto_grid checked
            y = y_all[j : j + step]
            if budget < positions:
                pick = torch.randperm(positions, generator=generator)[:budget].to(cols.device)
                cols, y = cols[..., pick], y[..., pick]
            for fold in (0, 1):  # alternate images
                c, t = cols[(i + j + fold) % 2 :: 2], y[(i + j + fold) % 2 :: 2]
                c = c.permute(1, 0, 3, 2).reshape(groups, -1, c.shape[2])
                equations.add(_with_ones(c, bias is not None), t.permute(1, 0, 3, 2).reshape(groups, -1, outs), fold)
            del cols
    current = weight.detach().reshape(groups, outs, -1).transpose(1, 2)  # (groups, features, outs)
    if bias is not None:
        current = torch.cat([current, bias.detach().reshape(groups, 1, outs)], dim=1)
    solution, fit = equations.solve(current, ridges, bias is not None)
    weight.copy_(solution[:, : features - (bias is not None), :].transpose(1, 2).reshape(weight.shape))
    if bias is not None:
        bias.copy_(solution[:, -1, :].reshape(-1))
    return fit


def linear_targets(student: OnnxModule, names: dict[str, str]) -> list:
    """Gemm nodes (the classifier) with a trainable 2-D weight whose output has a counterpart in the
    teacher (`names`: student -> teacher tensor)."""
    trainable = student.trainable()
    found = []
    for node in student.nodes:
        a = node.attributes
        if (
            node.op_type == "Gemm"
            and node.inputs[1].name in trainable
            and (len(node.inputs) < 3 or node.inputs[2] is None or node.inputs[2].name in trainable)
            and not a.get_int("transA", 0)
            and a.get_float("alpha", 1.0) == 1.0
            and a.get_float("beta", 1.0) == 1.0
            and trainable[node.inputs[1].name].dim() == 2
            and node.outputs[0].name in names
        ):
            found.append(node)
    return found


@torch.no_grad()
def refit_linear(
    student: Frontier,
    teacher: Frontier,
    node,
    position: int,
    ridges: tuple[float, ...] = RIDGES,
    teacher_output: str | None = None,
) -> dict:
    """Refit one Gemm (y = a @ w' + c, or a @ w; at `position` in the student's graph) in place
    against the teacher's output (`teacher_output`, default: the Gemm's own output name)."""
    params = student.module.trainable()
    weight = params[node.inputs[1].name]
    trans = bool(node.attributes.get_int("transB", 0))
    bias = params[node.inputs[2].name] if len(node.inputs) > 2 and node.inputs[2] is not None else None
    w = weight.detach().t() if trans else weight.detach()  # (in, out)
    if bias is not None and bias.numel() != w.shape[1]:
        return {}  # a broadcast bias of another shape: left as it is
    equations = NormalEquations(1, w.shape[0] + (bias is not None), w.shape[1], weight.device)
    source, output = node.inputs[0].name, teacher_output or node.outputs[0].name
    for (i, got), (_, want) in zip(student.tensors([source], position), teacher.tensors([output])):
        rows = _with_ones(got[source].flatten(1), bias is not None)
        y = want[output].flatten(1)
        for fold in (0, 1):  # alternate images
            equations.add(rows[(i + fold) % 2 :: 2][None], y[(i + fold) % 2 :: 2][None], fold)
    current = torch.cat([w, bias.detach()[None]]) if bias is not None else w
    solution, fit = equations.solve(current[None], ridges, bias is not None)
    solution = solution[0]
    weight.copy_(solution[: w.shape[0]].t() if trans else solution[: w.shape[0]])
    if bias is not None:
        bias.copy_(solution[-1])
    return fit


@torch.no_grad()
def calibrate_reconstruct(
    student: OnnxModule,
    teacher: OnnxModule,
    x: torch.Tensor,
    batch: int = 250,
    ridges: tuple[float, ...] = RIDGES,
    progress: Progress | None = None,
    seed: int = 0,
    spatial: bool = True,
    after_blur: bool = True,
    names: dict[str, str] | None = None,
) -> list[dict]:
    """Refit every target conv of `student` in place, in graph order, then the classifier; returns one
    record per layer. Each node runs once per image (`Frontier`), not once per conv.

    `spatial=False` (distill's default start, `pointwise`) refits only the convs with 1x1 kernels and
    gives the others `stats`' per-channel rescaling: a spatial kernel refit against the original can
    sharpen itself to undo the blurs before it, bringing back the aliasing they removed, which a
    channel mix cannot. `after_blur=False` rescales only the spatial convs that read a blur's output
    and refits the rest, for the same reason (docs/results.md, "Calibrating on images that may ship").
    `names`: the teacher counterparts (`matching.counterparts`) where the caller has them already."""
    names = counterparts(student, teacher).names if names is None else names
    targets = conv_targets(student, teacher, names)
    nodes = {n.name: n for n in student.nodes}
    params = student.trainable()
    generator = torch.Generator().manual_seed(seed)
    held, reference = Frontier(student, x, batch), Frontier(teacher, x, batch)
    report = []
    advance = counter(progress, "refitting convs (closed-form start)", len(targets))
    for target in targets:
        advance(1)
        position = student.producers[target.own_output]  # the conv's place in the student graph
        if _refittable(nodes[target.node], params[target.weight], target, spatial, after_blur):
            fit = refit_conv(held, reference, target, nodes[target.node], position, ridges, generator, names)
            report.append({"node": target.node, "refit": True} | fit)
            continue
        rescale(params, target, moments(held, {target.output}, position)[target.output],
                moments(reference, {target.teacher_output})[target.teacher_output])  # fmt: skip
        report.append({"node": target.node, "refit": False})
    for node in linear_targets(student, names):
        fit = refit_linear(
            held, reference, node, student.producers[node.outputs[0].name], ridges, names[node.outputs[0].name]
        )
        report.append({"node": node.name, "refit": True} | fit)
    return report
