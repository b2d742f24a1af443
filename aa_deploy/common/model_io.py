"""Loading and saving models: lazy external data, atomic writes, the checker, aa-deploy metadata."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from aa_deploy.common.errors import InputError

META_PREFIX = "aa_deploy."
MIN_OPSET = 11
PROTO_LIMIT = 1_800_000_000  # stay under protobuf's 2 GiB with room for the graph


class CheckError(InputError):
    """The written model fails onnx.checker (the message is the checker's first line)."""


def check_input(path: str | os.PathLike) -> str | None:
    """onnx.checker's complaint about a model file (full check, path-based), or None if it passes."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        return str(e).splitlines()[0]
    return None


def opset_of(model: ir.Model) -> int | None:
    """The model's default-domain opset."""
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx"))


def upgrade_opset(model: ir.Model, target: int, source: str = "model") -> ir.Model:
    """`model` moved to opset `target` by onnx.version_converter (the ONNX Model Zoo's classic graphs are
    opset 7-9); the upgrade is recorded in the metadata (`aa_deploy.opset_upgrade`). The graph's
    inputs and outputs keep their names, types and shapes; the IR version stays as it was."""
    from onnx import version_converter

    old = opset_of(model)
    proto = ir.to_proto(ir.external_data.load_to_model(model))  # old graphs are small: weights in memory
    try:
        upgraded = version_converter.convert_version(proto, target)
        onnx.checker.check_model(upgraded)
    except Exception as e:  # the converter raises RuntimeError, IndexError, checker errors...
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        reason = reason.split(" failed: ", 1)[-1]  # the converter's C++ assertion prefix says nothing to a user
        raise InputError(f"{source}: cannot upgrade opset {old} to {target} ({reason})") from None
    upgraded.ir_version = proto.ir_version
    result = ir.from_proto(upgraded)
    write_metadata(result, {"opset_upgrade": {"from": old, "to": target}})
    return result


def load(path: str | os.PathLike, target_opset: int | None = None) -> ir.Model:
    """Load an ONNX model; external weights stay on disk (memory-mapped) until used.

    Opsets below MIN_OPSET (or below `target_opset`) are upgraded with onnx.version_converter."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    try:
        model = ir.load(path)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as e:
        raise InputError(
            f"{path}: not a readable ONNX model "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'parse error'})"
        ) from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(model.graph) == 0 or not model.graph.outputs:
        raise InputError(f"{path}: not a usable ONNX model (empty graph; truncated or not ONNX?)")
    opset = opset_of(model)
    if opset is None:
        raise InputError(f"{path}: the model imports no default-domain opset")
    if target_opset is not None and target_opset < MIN_OPSET:
        raise InputError(f"--target-opset {target_opset}: aa-deploy needs opset {MIN_OPSET} or newer")
    target = max(MIN_OPSET, target_opset or 0)
    if opset < target:
        model = upgrade_opset(model, target, str(path))
    try:
        model.graph.sort()  # exporters may list nodes out of order; a cycle cannot be ordered at all
    except ValueError as e:
        raise InputError(f"{path}: not a valid ONNX graph ({e})") from None
    counts = Counter(n.name for n in model.graph if n.name)
    duplicates = sorted(name for name, k in counts.items() if k > 1)
    if duplicates:
        raise InputError(
            f"{path}: duplicate node names ({', '.join(duplicates[:3])}); ONNX Runtime refuses such models"
        )
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor) and not Path(tensor.path).exists():
            raise InputError(f"{path}: external data file {tensor.location!r} is missing")
    return model


def uses_external_data(model: ir.Model) -> bool:
    """True when any initializer lives in an external file, or the weights are too big for one proto."""
    total = 0
    for value in model.graph.initializers.values():
        if isinstance(value.const_value, ir.ExternalTensor):
            return True
        total += value.const_value.nbytes if value.const_value is not None else 0
    return total > PROTO_LIMIT


def data_path(path: str | os.PathLike) -> Path:
    """Where `save` puts the weights of a model written to `path` with external data."""
    path = Path(path)
    return path.with_name(path.name + ".data")


def data_files(path: str | os.PathLike) -> list[Path]:
    """The external data files the model at `path` names, its initializers' and its Constant nodes'
    (none when `path` is not a readable model)."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # not a model (an image, a folder): it names no data files
        return []
    tensors = list(proto.graph.initializer)
    tensors += [a.t for node in proto.graph.node for a in node.attribute if a.HasField("t")]
    names = {
        entry.value
        for t in tensors
        if t.data_location == onnx.TensorProto.EXTERNAL
        for entry in t.external_data
        if entry.key == "location"
    }
    return [Path(path).parent / name for name in sorted(names)]


def non_finite(model: ir.Model) -> str | None:
    """The name of the first floating-point initializer of `model` holding a NaN or an infinity, or None."""
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if tensor is None or value.dtype is None or not value.dtype.is_floating_point():
            continue
        if not np.isfinite(np.asarray(tensor.numpy(), dtype=np.float64)).all():
            return name
    return None


def save(model: ir.Model, path: str | os.PathLike, *, external: bool, check: bool = True) -> None:
    """Write `model` to `path` atomically: a temporary file in the same folder, checked, then renamed.

    With `external`, weights go to `<name>.data` beside it, and the two appear together or not at all: a
    model already at `path` is moved aside before its data file is replaced (and back if that fails), so
    that no model file ever stands beside data it was not written with. Nothing is left behind on failure.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"{folder}: output folder does not exist")
    if path.is_dir():
        raise InputError(f"{path}: is a folder")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".aa-deploy-", dir=folder))
    except OSError as e:
        raise InputError(f"{folder}: cannot write here ({e.strerror or e})") from None
    if (bad := non_finite(model)) is not None:
        raise InputError(f"{path}: not written: initializer {bad!r} holds non-finite values (NaN or inf)")
    list_initializers_as_inputs(model)
    try:
        data_name = data_path(path).name if external else None
        ir.save(model, tmp / path.name, external_data=data_name)
        if check:
            try:
                onnx.checker.check_model(str(tmp / path.name), full_check=True)
            except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
                raise CheckError(str(e).splitlines()[0]) from None
        if data_name:
            _commit_pair(tmp, path, data_name)
        else:
            os.replace(tmp / path.name, path)
    except OSError as e:
        raise InputError(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _commit_pair(tmp: Path, path: Path, data_name: str) -> None:
    """Move the model and its data file from `tmp` to `path`'s folder: an old model at `path` goes aside
    first (no model then, rather than one beside new data), comes back if the data cannot be moved, and
    is dropped once the new model is in place."""
    aside = tmp / (".old-" + path.name)
    if path.exists():
        os.replace(path, aside)
    try:
        os.replace(tmp / data_name, path.parent / data_name)
    except OSError:
        if aside.exists():
            os.replace(aside, path)
        raise
    os.replace(tmp / path.name, path)


def list_initializers_as_inputs(model: ir.Model) -> None:
    """Before IR version 4 every initializer must also be a graph input: list those that are not (the
    blur taps and pads aa-deploy adds) after the model's own inputs. Runtimes treat such inputs as
    constants with defaults (ONNX Runtime does not list them in `get_inputs()`). Raising the IR version
    instead would turn the model's own weight inputs into overridable inputs, which ONNX Runtime then no
    longer folds or fuses (and warns about for every one of them)."""
    if model.ir_version >= 4:
        return
    listed = {id(v) for v in model.graph.inputs}
    for value in model.graph.initializers.values():
        if id(value) not in listed:
            model.graph.inputs.append(value)


def write_metadata(model: ir.Model, fields: dict) -> None:
    """Record `fields` under the aa_deploy.* keys of the model's metadata_props (JSON values)."""
    for key, value in fields.items():
        model.metadata_props[META_PREFIX + key] = value if isinstance(value, str) else json.dumps(value)


def read_metadata(model: ir.Model | onnx.ModelProto) -> dict:
    """The aa_deploy.* metadata of a model (JSON values decoded), {} for an unconverted model."""
    props = model.metadata_props if isinstance(model, ir.Model) else {p.key: p.value for p in model.metadata_props}
    out = {}
    for key, value in props.items():
        if key.startswith(META_PREFIX):
            try:
                out[key.removeprefix(META_PREFIX)] = json.loads(value)
            except json.JSONDecodeError:
                out[key.removeprefix(META_PREFIX)] = value
    return out


def sites_where(model: ir.Model | onnx.ModelProto, action: str) -> set[str]:
    """The nodes of the sites `convert` recorded in `model`'s metadata as taking `action` (e.g. "blurpool",
    "dense"): the one reader of the recorded sites."""
    sites = read_metadata(model).get("sites") or []
    return {e["node"] for e in sites if isinstance(e, dict) and e.get("action") == action and "node" in e}


def load_proto(path: str | os.PathLike) -> onnx.ModelProto:
    """The model's protobuf without its external data (for its inputs and metadata), or a one-line error."""
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - any parse failure is the user's file
        raise InputError(f"{path}: not a readable ONNX model ({type(e).__name__})") from None


def input_spec(path: str | os.PathLike, *, with_type: bool = False) -> tuple:
    """(name, dims) of the model's single input; dims are ints or names of dynamic axes. `with_type`:
    (name, dims, element type as a numpy name)."""
    if not Path(path).is_file():
        raise InputError(f"{path}: no such file")
    m = load_proto(path)
    inits = {i.name for i in m.graph.initializer}
    inputs = [i for i in m.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise InputError(f"{path}: aa-deploy measures single-input models; this one has {len(inputs)} inputs")
    dims = [
        d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in inputs[0].type.tensor_type.shape.dim
    ]
    if not with_type:
        return inputs[0].name, dims
    elem = inputs[0].type.tensor_type.elem_type
    return inputs[0].name, dims, onnx.helper.tensor_dtype_to_np_dtype(elem).name if elem else "float32"
