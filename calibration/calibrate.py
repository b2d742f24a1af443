"""`aa-deploy calibrate`: converted ONNX + original ONNX + unlabeled images -> calibrated ONNX.

load both graphs -> split the images (a held-out slice for early stopping and the summary) ->
`stats` -> `distill` (default) -> write the weights back by initializer name -> check -> save.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from aa_deploy import model_io
from aa_deploy.consistency.paired import paired_difference
from aa_deploy.errors import InputError
from calibration.bridge import OnnxModule, write_back
from calibration.images import Preprocess, load_folder, normalize, preprocess_for

METHODS = ("stats", "distill")


@dataclass
class CalibrationResult:
    method: str
    images: int
    held_out: int
    before: dict  # held-out agreement with the teacher and shift consistency, before calibration
    after: dict
    teacher: dict
    seconds: float
    lr: float | None = None
    epochs: int | None = None
    best_epoch: int | None = None
    history: list = field(default_factory=list)
    # calibrated minus original consistency on the held-out images (same shifts: paired), per protocol
    versus_teacher: dict = field(default_factory=dict)


PROTOCOLS = {"consistency_pad_crop": ("random-crop", 4, "zero"), "consistency_circular": ("circular", 2, None)}


def _summary(module: OnnxModule, held: np.ndarray, prepare, teacher_top1: np.ndarray) -> tuple[dict, dict]:
    """Held-out agreement with the teacher and consistency (figures), with the ConsistencyResults."""
    from aa_deploy.consistency import measure

    def run(x):
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()

    agree = float((run(prepare(held)).argmax(1) == teacher_top1).mean()) if teacher_top1 is not None else 1.0
    results = {}
    for key, (protocol, shift, pad) in PROTOCOLS.items():
        try:
            results[key] = measure(protocol, run, prepare, held, crop=held.shape[1], shift=shift, pad=pad, passes=3)
        except InputError:  # a protocol that does not apply to this output (a dense map under pad-and-crop)
            continue
    return {"agreement": agree} | {
        key: results[key].consistency if key in results else None for key in PROTOCOLS
    }, results


def calibrate(
    model: str | os.PathLike,
    teacher: str | os.PathLike,
    images: str | os.PathLike,
    output: str | os.PathLike,
    *,
    method: str = "distill",
    preprocess: Preprocess | None = None,
    held_out: float = 0.1,
    limit: int | None = None,
    max_epochs: int = 45,
    patience: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    reinsert_bn: bool = False,
    mix: bool = True,
    progress=None,
    check: bool = True,
) -> CalibrationResult:
    """Calibrate the converted `model` against `teacher` on the unlabeled `images`; writes `output`."""
    import time

    from calibration.distill import distill
    from calibration.stats import calibrate_stats

    if method not in METHODS:
        raise InputError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    start = time.perf_counter()
    torch.manual_seed(seed)
    model_path, out_path = Path(model), Path(output)
    if out_path.exists() and model_path.exists() and os.path.samefile(model_path, out_path):
        raise InputError(f"{out_path}: output would overwrite the input")
    student_ir = model_io.load(model_path)
    teacher_ir = model_io.load(teacher)
    student, teacher_m = OnnxModule(student_ir).eval(), OnnxModule(teacher_ir).eval()
    dims = [d if isinstance(d, int) else None for d in (student_ir.graph.inputs[0].shape or [])]
    preprocess = preprocess_for(dims[-1] if dims else None, preprocess)
    raw, _ = load_folder(images, preprocess, limit=limit)
    if len(raw) < 20:
        raise InputError(f"{images}: {len(raw)} images is too few to calibrate (need 20 or more)")

    def prepare(x: np.ndarray) -> np.ndarray:
        return normalize(x, preprocess)

    order = np.random.default_rng(seed).permutation(len(raw))
    n_held = max(10, int(round(held_out * len(raw))))
    held, train = raw[order[:n_held]], raw[order[n_held:]]
    with torch.no_grad():
        teacher_top1 = teacher_m(torch.from_numpy(prepare(held))).argmax(1).numpy()
    if method == "distill" and teacher_top1.ndim != 1:
        raise InputError(
            "distill matches the class probabilities of an (N, classes) output, and this model's output is not one "
            "(a dense map or a detection head): use --method stats"
        )
    teacher_summary, teacher_runs = _summary(teacher_m, held, prepare, None)
    before, _ = _summary(student, held, prepare, teacher_top1)
    calibrate_stats(student, teacher_m, torch.from_numpy(prepare(train[:1000])))
    report = None
    if method == "distill":
        report = distill(
            student,
            teacher_m,
            train,
            held,
            prepare,
            max_epochs=max_epochs,
            patience=patience,
            lr=lr,
            seed=seed,
            reinsert_bn=reinsert_bn,
            mix=mix,
            progress=progress,
        )
    after, after_runs = _summary(student, held, prepare, teacher_top1)
    versus = {key: paired_difference(teacher_runs[key], after_runs[key]).as_dict() for key in after_runs}

    values = {name: p.detach().numpy() for name, p in student.trainable().items()}
    write_back(student_ir, values)
    result = CalibrationResult(
        method,
        len(raw),
        len(held),
        before,
        after,
        teacher_summary,
        time.perf_counter() - start,
        lr=report.lr if report else None,
        epochs=report.epochs if report else None,
        best_epoch=report.best_epoch if report else None,
        history=report.history if report else [],
        versus_teacher=versus,
    )
    model_io.write_metadata(
        student_ir,
        {
            "calibration": {
                "method": method,
                "images": str(images),
                "count": len(raw),
                "held_out": len(held),
                "seed": seed,
                "lr": result.lr,
                "epochs": result.epochs,
                "before": before,
                "after": after,
                "versus_teacher": versus,
                "preprocess": preprocess.as_dict(),
            }
        },
    )
    model_io.save(student_ir, out_path, external=model_io.uses_external_data(student_ir), check=check)
    return result
