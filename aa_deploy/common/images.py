"""Image folders and preprocessing: the one notion of "images" shared by verify, consistency,
calibration and INT8 calibration data."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from aa_deploy.common.errors import InputError
from aa_deploy.common.input_format import InputFormat, Size, hw, size_text, square_or_pair

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The centre crop's share of the resized short side when no resize is given: ImageNet's usual 224 of 256.
CROP_SHARE = 224 / 256


@dataclass(frozen=True)
class Preprocess:
    """Resize the short side to `resize` (default: `default_resize`), centre-crop `size` (one side, or
    (height, width)), scale to [0, 1], normalize."""

    size: Size = 224
    resize: int | None = None
    mean: tuple[float, ...] = IMAGENET_MEAN  # one value per channel the model takes (3, or 1 for grayscale)
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self) -> None:
        sides = list(self.size) if isinstance(self.size, (tuple, list)) else [self.size]
        if (
            len(sides) not in (1, 2)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in sides)
            or (self.resize is not None and (not isinstance(self.resize, int) or self.resize < 1))
        ):
            raise InputError(
                "preprocessing: size (one side, or [height, width]) and resize must be whole numbers of pixels >= 1, "
                f"not {self.size}, {self.resize}"
            )
        height, width = sides if len(sides) == 2 else sides * 2
        object.__setattr__(self, "size", square_or_pair(height, width))
        if not all(np.isfinite(self.mean)) or not all(np.isfinite(self.std)) or min(self.std) <= 0:
            raise InputError(
                f"preprocessing: mean must be finite and std positive, not mean {self.mean}, std {self.std}"
            )

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Preprocess:
        """Read {"size": .., "resize": .., "mean": [..], "std": [..]} from a JSON file."""
        try:
            data = json.loads(Path(path).read_text())
            return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
        except (OSError, json.JSONDecodeError, TypeError) as e:
            raise InputError(f"{path}: not a preprocessing file ({e})") from None

    @property
    def hw(self) -> tuple[int, int]:
        """(height, width) of the crop."""
        return hw(self.size)

    def as_dict(self) -> dict:
        return asdict(self)


def preprocess_for(fmt: InputFormat, preprocess: Preprocess | None, source: str = "model") -> Preprocess:
    """The preprocessing for a model whose input is `fmt` (a dynamic size: 224 px): the user's, checked
    against the input's size and channels, or the default at that size (ImageNet's mean and std, which
    a grayscale input has no default for)."""
    size = fmt.size()
    if preprocess is None:
        if fmt.channels != 3:
            raise InputError(
                f"{source} takes {fmt.channels}-channel images: give their --mean and --std "
                "(one value each), or a --preprocess file"
            )
        return Preprocess(size=size or 224)
    if size and hw(size) != preprocess.hw:
        raise InputError(
            f"preprocessing gives {size_text(preprocess.size)} images, the model takes {size_text(size)} (--size)"
        )
    _check_channels(preprocess, fmt, source)
    return preprocess


def _check_channels(pre: Preprocess, fmt: InputFormat, source: str) -> None:
    """A one-line error unless `pre` normalizes as many channels as the input `fmt` takes."""
    if len(pre.mean) != fmt.channels or len(pre.std) != fmt.channels:
        raise InputError(
            f"{source} takes {fmt.channels}-channel images and the preprocessing normalizes "
            f"{len(pre.mean)}/{len(pre.std)} (mean/std; give --mean and --std with {fmt.channels} "
            f"value{'s' if fmt.channels > 1 else ''} each)"
        )


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under `folder`, recursively, sorted; a clear error for a missing or empty folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such image folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())
    if not files:
        raise InputError(f"{folder}: no images found (looked for {', '.join(sorted(EXTENSIONS))})")
    return files


def spread(files: list[Path], limit: int | None, root: str | os.PathLike) -> list[Path]:
    """At most `limit` of `files` (sorted), spread over the folder rather than the first ones: with one
    folder per class, the classes in turn (each class's files in order); otherwise evenly spaced.
    The first N files of a class-per-folder tree would be one or two classes."""
    if limit is None or limit >= len(files):
        return files
    if limit <= 0:
        return []
    groups: dict = {}
    for p in files:
        groups.setdefault(p.parent.relative_to(root), []).append(p)
    if len(groups) > 1:
        picked: list[Path] = []
        for k in range(max(len(g) for g in groups.values())):
            picked += [g[k] for g in groups.values() if k < len(g)]
            if len(picked) >= limit:
                break
        return sorted(picked[:limit])
    return [files[i] for i in np.linspace(0, len(files) - 1, limit).round().astype(int)]


def load_rgb(path: Path, pre: Preprocess) -> np.ndarray:
    """One image as uint8 HWC after resize and centre crop."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = _rgb8(im, path)
            height, width = pre.hw
            w, h = im.size
            resize = pre.resize or default_resize(max(height, width), min(w, h))
            scale = resize / min(w, h)
            im = im.resize((max(resize, round(w * scale)), max(resize, round(h * scale))), Image.BILINEAR)
            w, h = im.size
            left, top = (w - width) // 2, (h - height) // 2
            return np.asarray(im.crop((left, top, left + width, top + height)), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"{path}: unreadable image ({e})") from None
    except Image.DecompressionBombError as e:
        raise InputError(f"{path}: refused as a decompression bomb by Pillow ({e})") from None


def default_resize(crop: int, short_side: int) -> int:
    """The short side an image is resized to before a centre crop whose longer side is `crop` px, when the
    preprocessing gives no resize: the usual ratio (the crop CROP_SHARE of it, 256 px for 224) where the
    image has the pixels, the image as it is where it is between the two (never upscaled past the crop),
    the crop's side where it is smaller (a 32-px image for a 32-px model is taken whole)."""
    return max(crop, min(round(crop / CROP_SHARE), short_side))


def _rgb8(im, path: Path):
    """An RGB image of 8 bits per channel, each mode scaled by its real range: 16-bit and 32-bit
    integer greyscale (16-bit PNGs) by 65535, floating-point greyscale (TIFF) taken as 0..1; other
    float ranges are refused in one line rather than clipped."""
    from PIL import Image

    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(im, dtype=np.float64)
        if im.mode == "F":
            if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
                raise InputError(f"{path}: a floating-point image with values outside 0..1: convert it to 8 or 16 bits")
            a = a * 255.0
        else:
            if a.min() < 0 or a.max() > 65535:
                raise InputError(f"{path}: a 32-bit integer image with values outside 0..65535")
            a = a / 257.0
        return Image.fromarray(np.round(a).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")


# ITU-R 601 luma, as PIL's convert("L") weighs RGB
LUMA = np.asarray([0.299, 0.587, 0.114], np.float32)


def normalize(images: np.ndarray, pre: Preprocess, fmt: InputFormat = InputFormat()) -> np.ndarray:
    """uint8 RGB NHWC -> the model's input (`fmt`, default float32 RGB NCHW): scaled to [0, 1], made
    grayscale for a 1-channel input, normalized with `pre.mean`/`pre.std`, in the input's layout and type."""
    x = images.astype(np.float32) / 255.0
    if fmt.channels == 1:
        x = x @ LUMA[:, None]
    _check_channels(pre, fmt, "the model")
    mean, std = np.asarray(pre.mean, np.float32), np.asarray(pre.std, np.float32)
    return fmt.feed(((x - mean) / std).transpose(0, 3, 1, 2))


def load_folder(folder: str | os.PathLike, pre: Preprocess, limit: int | None = None) -> tuple[np.ndarray, list[Path]]:
    """All images of `folder` (or `limit` of them, spread over it) as uint8 NHWC, with their paths."""
    files = spread(list_images(folder), limit, folder)
    return np.stack([load_rgb(p, pre) for p in files]), files


def folder_labels(files: list[Path], root: str | os.PathLike) -> np.ndarray | None:
    """Labels from a folder-per-class layout (classes sorted by name), or None if not laid out so."""
    parents = [p.parent.relative_to(root).parts for p in files]
    if any(len(parts) != 1 for parts in parents):
        return None
    classes = sorted({parts[0] for parts in parents})
    index = {c: i for i, c in enumerate(classes)}
    return np.asarray([index[parts[0]] for parts in parents])


def csv_labels(path: str | os.PathLike, files: list[Path], root: str | os.PathLike) -> np.ndarray:
    """Integer labels for `files` from a CSV of `file,label` rows (file relative to `root`, or its name)."""
    import csv

    table: dict[str, int] = {}
    try:
        with open(path, newline="") as f:
            for row in csv.reader(f):
                if len(row) < 2 or row[0].strip().lower() in ("file", "filename", "path"):
                    continue
                table[row[0].strip()] = int(row[1])
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a file,label CSV with integer class indices ({e})") from None
    labels = []
    for p in files:
        key = next((k for k in (str(p.relative_to(root)), p.name) if k in table), None)
        if key is None:
            raise InputError(f"{path}: no label for {p.relative_to(root)}")
        labels.append(table[key])
    return np.asarray(labels)


class ImageFiles:
    """Images decoded from disk when read (resize + centre crop), never all at once: a torch Dataset
    of uint8 HWC arrays, indexable like an array by one index or an index array."""

    def __init__(self, files: list[Path], pre: Preprocess) -> None:
        self.files, self.pre = list(files), pre

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index):
        if np.ndim(index) == 0:
            return load_rgb(self.files[int(index)], self.pre)
        return np.stack([load_rgb(self.files[int(i)], self.pre) for i in index])


def batches(images, order: np.ndarray, batch: int, workers: int | None = None):
    """uint8 NHWC batches of `images` (an array, or `ImageFiles` decoded in DataLoader workers) in `order`."""
    if isinstance(images, np.ndarray):
        for i in range(0, len(order), batch):
            yield images[order[i : i + batch]]
        return
    import torch

    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    chunks = [order[i : i + batch].tolist() for i in range(0, len(order), batch)]
    loader = torch.utils.data.DataLoader(images, batch_sampler=chunks, num_workers=workers, collate_fn=np.stack)
    try:
        yield from loader
    except InputError as e:  # raised in a worker: torch re-raises it with the worker's traceback as its text
        raise InputError(str(e).strip().splitlines()[-1].split("InputError: ", 1)[-1]) from None
