"""TensorRT engines: build from an ONNX graph whose precision is already in it, a sidecar that says
what an engine is, and a runner behind the `run(feeds) -> outputs` interface (polygraphy's).

TensorRT 10 builds strongly typed networks on request; TensorRT 11 always does and has no FP16/INT8
builder flags, so precision comes from the graph (FP16 conversion, Q/DQ) for both. Everything here
that needs no GPU (shape profiles, sidecars, version checks) is plain Python; building and running
need the `tensorrt` and `polygraphy` packages and an NVIDIA GPU, and say which is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from aa_deploy.common.atomic import atomic_path, write_text
from aa_deploy.common.errors import InputError
from aa_deploy.common.version import __version__
from aa_deploy.converters.batching import run_in_batches
from aa_deploy.converters.interface import Runner

PRECISIONS = ("fp32", "fp16", "int8")


def parse_shapes(text: str) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """`x:1x3x224x224,8x3x224x224,32x3x224x224[;y:...]` -> {name: (min, opt, max)}.

    One shape means min = opt = max; three are min, opt, max, which must agree in rank and order.
    """
    profiles = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, sep, shapes = part.rpartition(":")
        if not sep or not name:
            raise InputError(f"bad shape profile {part!r}: write NAME:MINxCxHxW,OPTx...,MAXx...")
        try:
            dims = [tuple(int(d) for d in s.lower().split("x")) for s in shapes.split(",")]
        except ValueError:
            raise InputError(f"bad shape profile {part!r}: dims must be integers joined by x") from None
        if len(dims) == 1:
            dims = dims * 3
        if len(dims) != 3 or len({len(d) for d in dims}) != 1 or any(v <= 0 for d in dims for v in d):
            raise InputError(f"bad shape profile {part!r}: give one shape or three (min, opt, max) of one rank")
        lo, opt, hi = dims
        if not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
            raise InputError(f"bad shape profile {part!r}: need min <= opt <= max in every dim")
        profiles[name] = (lo, opt, hi)
    if not profiles:
        raise InputError("no shape profile given")
    return profiles


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Sidecar:
    """What an engine is: written as `<engine>.json` beside it."""

    onnx_sha256: str
    onnx_path: str
    tensorrt_version: str
    precision: str
    shapes: dict
    aa_deploy_version: str = __version__

    @staticmethod
    def path_for(engine: str | os.PathLike) -> Path:
        return Path(f"{engine}.json")

    def onnx_file(self, engine: str | os.PathLike) -> Path:
        """The ONNX source, whose path the sidecar keeps relative to the engine `engine`."""
        return Path(engine).parent / self.onnx_path

    def write(self, engine: str | os.PathLike) -> None:
        write_text(self.path_for(engine), json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, engine: str | os.PathLike) -> Sidecar:
        path = cls.path_for(engine)
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise InputError(f"{engine}: no sidecar {path.name} (engines are built by aa-deploy build)") from None
        except (json.JSONDecodeError, TypeError) as e:
            raise InputError(f"{path}: not an aa-deploy engine sidecar ({e})") from None


def check_version(sidecar: Sidecar, installed: str) -> None:
    """TensorRT engines only load in the TensorRT version that built them: refuse others clearly."""
    if sidecar.tensorrt_version != installed:
        raise InputError(
            f"engine built by TensorRT {sidecar.tensorrt_version}, this is TensorRT {installed}: rebuild it "
            f"(aa-deploy build {sidecar.onnx_path} ...)"
        )


def require_tensorrt():
    """The tensorrt module, or a one-line error naming what is missing."""
    try:
        import tensorrt
    except ImportError:
        raise InputError(
            "TensorRT is not installed: pip install 'aa-deploy[gpu]' (tensorrt, polygraphy) on a machine with an NVIDIA GPU"
        ) from None
    try:
        import polygraphy  # noqa: F401
    except ImportError:
        raise InputError("polygraphy is not installed: pip install polygraphy") from None
    return tensorrt


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    shapes: dict,
    precision: str,
    timing_cache: str | os.PathLike | None = None,
) -> Sidecar:
    """Build a TensorRT engine from an ONNX graph that already holds its precision; writes the sidecar."""
    trt = require_tensorrt()
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile

    major = int(trt.__version__.split(".")[0])
    profile = Profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.add(name, lo, opt, hi)
    # TensorRT 11 is always strongly typed (the flag is deprecated there); TensorRT 10 needs it asked for.
    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True if major < 11 else None)
    config = CreateConfig(profiles=[profile], load_timing_cache=str(timing_cache) if timing_cache else None)
    try:
        engine = EngineBytesFromNetwork(
            network, config, save_timing_cache=str(timing_cache) if timing_cache else None
        )()
    except Exception as e:  # noqa: BLE001 - TensorRT reports a missing GPU and parser errors alike
        raise InputError(f"TensorRT could not build {onnx_path}: {str(e).splitlines()[0]}") from None
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(engine)
    sidecar = Sidecar(
        file_sha256(onnx_path),
        # relative to the engine, so that the pair can move together
        os.path.relpath(Path(onnx_path).resolve(), Path(engine_path).resolve().parent),
        trt.__version__,
        precision,
        {k: [list(v) for v in s] for k, s in shapes.items()},
    )
    sidecar.write(engine_path)
    return sidecar


def profile_batches(shapes: dict) -> tuple[int | None, int]:
    """(the one batch size of a profile whose min and max batch agree, else None; its max batch): an
    engine runs no more samples at a time than its profile's max."""
    lo, _, hi = next(iter(shapes.values()))
    return (lo[0] if lo[0] == hi[0] else None), hi[0]


class TensorRTRunner(Runner):
    """A built engine behind the runner interface (`interface.Runner`), after checking its sidecar's TensorRT
    version. Made active: the engine is deserialized and Polygraphy's runner activated here; `deactivate`
    releases both."""

    def __init__(self, engine_path: str | os.PathLike) -> None:
        require_tensorrt()
        self.engine_path = Path(engine_path)
        self.sidecar = Sidecar.read(engine_path)
        self.input_names = list(self.sidecar.shapes)
        self.output_names = None
        self.fixed_batch, self.max_batch = profile_batches(self.sidecar.shapes)
        self.activate()

    def _activate(self) -> None:
        trt = require_tensorrt()
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        check_version(self.sidecar, trt.__version__)
        self.runner = TrtRunner(EngineFromBytes(self.engine_path.read_bytes()))
        self.runner.activate()

    def _release(self) -> None:
        self.runner.deactivate()
        del self.runner

    def _infer(self, feeds: dict) -> list:
        outputs = self.runner.infer(feeds)
        if self.output_names is None:
            self.output_names = list(outputs)
        return [outputs[name] for name in self.output_names]

    def run(self, feeds: dict) -> list:
        self._active()
        return run_in_batches(self._infer, feeds, self.fixed_batch, lambda: self.output_names, self.max_batch)
