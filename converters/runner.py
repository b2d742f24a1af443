"""The one interface every backend runs behind: ONNX Runtime sessions, TensorRT engines and the PyTorch
reference alike. Code that compares or measures models takes a `Runner` and knows nothing else of the
backend (`parity.verify` and `consistency` build the runners; `comparator` and the protocols use them)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Runner(Protocol):
    """A model ready to run: its input names (the image input first), its output names (None until a backend
    that learns them on the first run has run), `run` on a batch of feeds returning every output in order,
    and a call on the first input returning the first output."""

    input_names: list[str]
    output_names: list[str] | None

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...

    def __call__(self, x: np.ndarray) -> np.ndarray: ...
