"""Atomic file writes: write beside the target, rename over it on success, remove on failure.

A reader never sees a half-written report, plot, engine or model, and a failed write leaves
nothing behind. (Models with external data use model_io.save, which moves two files.)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from aa_deploy.common import model_io
from aa_deploy.common.errors import InputError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` (same suffix, so writers that read it still can) to write to."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically; an unwritable place is the user's one-line error."""
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    except OSError as e:
        raise InputError(f"{path}: cannot write ({e.strerror or e})") from None


def refuse_overwrite(output: str | os.PathLike, *inputs: str | os.PathLike | None) -> None:
    """A one-line error when `output`, or the data file its weights would go to (`model_io.data_path`),
    is the same file as any of `inputs` (a model, a teacher, an image folder's file) or as an external
    data file an input model names: no command writes over what it reads unless its --in-place says
    so, and then it does not call this."""
    sources = [Path(source) for source in inputs if source is not None and Path(source).exists()]
    for folder in (source for source in sources if source.is_dir()):  # an image folder: any file in it
        out = Path(output)
        if out.exists() and out.resolve().is_relative_to(folder.resolve()):
            raise InputError(f"{out}: output would overwrite a file of an input folder ({folder}); give another path")
    sources = [source for source in sources if source.is_file()]
    read = [(source, source) for source in sources]
    read += [(data, source) for source in sources for data in model_io.data_files(source)]
    for out in (Path(output), model_io.data_path(output)):
        if not out.exists():
            continue
        for path, source in read:
            if path.exists() and os.path.samefile(out, path):
                what = f"an input ({source})" if path == source else f"the external data of an input ({source})"
                raise InputError(f"{out}: output would overwrite {what}; give another -o")
