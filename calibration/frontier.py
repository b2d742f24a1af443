"""Layer-by-layer passes that run each node once per image, not once per layer.

`stats` and `reconstruct` visit the convs in graph order, and each needs its conv's input on all the
calibration images with every conv before it already corrected. Rerunning the graph from the image
for each conv costs (number of convs) x (forward passes of the early, high-resolution layers):
EfficientNet-Lite0's 49 convs spent 87 % of a `reconstruct` there. A `Frontier` keeps, per batch of
images, the live tensors at the point of the graph the pass has reached and runs only the nodes
between that point and the next one asked for.

A frontier never runs past a node the caller is about to change (`commit_until`): what lies beyond
is computed on a copy and dropped. Batches whose live tensors would exceed the byte budget (held
again once they fit), graphs that cannot be held part way (`OnnxModule.streams`), and requests for
a tensor already released start again from the image, so the results are the same either way; only
the time differs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from aa_deploy.converters.bridge import OnnxModule

FRONTIER_BYTES = 768 << 20  # live tensors held per module, all batches together


def _bytes(env: dict) -> int:
    seen = {id(t): t for t in env.values() if isinstance(t, torch.Tensor)}
    return sum(t.numel() * t.element_size() for t in seen.values())


class Frontier:
    """Batches of `x` run through `module` up to a point of its graph, resumed on request."""

    def __init__(self, module: OnnxModule, x: torch.Tensor, batch: int, budget: int | None = None) -> None:
        self.module, self.x, self.batch = module, x, max(1, batch)
        self.budget = FRONTIER_BYTES if budget is None else budget
        self.starts = list(range(0, len(x), self.batch))
        self.envs: dict[int, dict] = {}  # batch start -> live tensors before node positions[start]
        self.positions: dict[int, int] = {}
        self.held_bytes: dict[int, int] = {}  # batch start -> bytes its live tensors take
        self.restarts = 0  # passes that began at the image again (a batch not held, or a tensor released)

    def __len__(self) -> int:
        return len(self.x)

    def tensors(self, names: Iterable[str], commit_until: int | None = None) -> Iterator[tuple[int, dict]]:
        """For each batch: (index of its first image, {name: tensor}). The held point moves on to
        where the last named tensor is computed, but not past node `commit_until`."""
        names = set(names)
        if not names:
            return
        module = self.module
        stop = max(module.producers[name] for name in names) + 1
        for start in self.starts:
            xb = self.x[start : start + self.batch].to(module.device)
            if not module.streams:
                yield start, self._from_image(xb, names)
                continue
            env, at = self.envs.pop(start, None), self.positions.pop(start, 0)
            passed = commit_until is not None and at > commit_until
            if env is None or passed or any(n not in env and module.producers[n] < at for n in names):
                self.restarts += at > 0 or start in self.held_bytes
                env, at = {module.input_name: module.laid_out(xb)}, 0  # released already (or not held): from the image
            found = {n: env[n] for n in names if n in env}
            if len(found) < len(names):
                at = module.run_nodes(env, at, stop if commit_until is None else min(stop, commit_until), names, found)
            if len(found) < len(names):  # beyond the point the caller will change: on a copy
                module.run_nodes(dict(env), at, stop, names, found)
            self._hold(start, env, at)
            yield start, found

    def _from_image(self, xb: torch.Tensor, names: set[str]) -> dict:
        wanted = names - {self.module.input_name}
        found = self.module(xb, capture=wanted)[1] if wanted else {}
        return found | ({self.module.input_name: xb} if self.module.input_name in names else {})

    def _hold(self, start: int, env: dict, at: int) -> None:
        """Keep the batch's live tensors if all batches' together stay within the budget (the held
        ones shrink as the pass reaches smaller feature maps: a batch left out now may fit later)."""
        self.held_bytes[start] = _bytes(env)
        if sum(self.held_bytes.values()) > self.budget:
            self.held_bytes[start] = 0
            return
        self.envs[start], self.positions[start] = env, at
