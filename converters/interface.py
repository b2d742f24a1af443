"""The one interface every backend runs behind: ONNX Runtime sessions, TensorRT engines and the PyTorch
reference alike. Code that compares or measures models takes a `Runner` and knows nothing else of the
backend (`parity.verify` and `consistency` build the runners; `comparator` and the protocols use them).

The lifecycle is Polygraphy's: `activate` loads what the backend runs (a session, an engine, a module on its
device) and `deactivate` releases it; a `with` block does both. A runner is made active, so that a model
the backend cannot load is refused where the runner is made, in one line; `deactivate` frees it early, and
`activate` loads it again."""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class Runner(ABC):
    """A model ready to run: its input names (the image input first), its output names (None until a backend
    that learns them on the first run has run), `run` on a batch of feeds returning every output in order,
    `infer` returning them by name, and a call on the first input returning the first output."""

    input_names: list[str]
    output_names: list[str] | None
    is_active: bool = False

    def activate(self) -> Runner:
        if not self.is_active:
            self._activate()
            self.is_active = True
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self._release()
            self.is_active = False

    def __enter__(self) -> Runner:
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    @abstractmethod
    def _activate(self) -> None: ...

    @abstractmethod
    def _release(self) -> None: ...

    @abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every output by name (Polygraphy's `infer`)."""
        outputs = self.run(feeds)
        return dict(zip(self.output_names, outputs))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The first output for a single-input model."""
        return self.run({self.input_names[0]: x})[0]

    def _active(self) -> None:
        if not self.is_active:
            raise RuntimeError(f"{type(self).__name__} is not active: activate it (or use it in a with block)")
