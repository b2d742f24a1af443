"""What a model's image input takes: its layout (NCHW or NHWC), channel count (3 or 1), height x width and
float type, read from the graph (and from the user's --layout where the graph cannot say)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np

from aa_deploy.common import model_io
from aa_deploy.common.errors import InputError

LAYOUTS = ("NCHW", "NHWC")
# An image size: one side for square images, (height, width) for others.
Size = int | tuple[int, int]


def hw(size: Size) -> tuple[int, int]:
    """(height, width) of `size`."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def square_or_pair(height: int, width: int) -> Size:
    """The side of a square, or (height, width): squares keep the one number they have always been written as."""
    return height if height == width else (height, width)


def size_text(size: Size) -> str:
    """'224 px' or '128x192 (height x width)'."""
    h, w = hw(size)
    return f"{h} px" if h == w else f"{h}x{w} (height x width)"


CHANNELS = (1, 3)
FLOATS = ("float32", "float16")


@dataclass(frozen=True)
class InputFormat:
    """An image input: `layout`, `channels`, `height` and `width` (None where the graph leaves them dynamic),
    and the float type (`dtype`) the model is fed."""

    layout: str = "NCHW"
    channels: int = 3
    height: int | None = None
    width: int | None = None
    dtype: str = "float32"

    def size(self) -> Size | None:
        """The images this input takes: a side for square ones, (height, width) otherwise; None where the
        graph leaves both dynamic (one dynamic axis takes the other's size)."""
        if self.height is None and self.width is None:
            return None
        return square_or_pair(self.height or self.width, self.width or self.height)

    def feed(self, x: np.ndarray) -> np.ndarray:
        """Normalized float32 NCHW images as this input takes them: its layout and float type."""
        if self.layout == "NHWC":
            x = x.transpose(0, 2, 3, 1)
        return np.ascontiguousarray(x, dtype=self.dtype)

    def as_dict(self) -> dict:
        return asdict(self)


def from_dims(dims: list, dtype: str, layout: str | None = None, source: str = "model") -> InputFormat:
    """The format of an input with `dims` (ints, or names/None for dynamic axes) and element type `dtype`
    (a numpy name). The layout is the one whose channel axis holds 1 or 3 (`layout` where the user says, or
    where both axes could); a 4-D input whose channel axis holds neither is refused in one line."""
    if layout is not None and layout not in LAYOUTS:
        raise InputError(f"--layout must be NCHW or NHWC, not {layout!r}")
    if len(dims) != 4:
        raise InputError(
            f"{source}: aa-deploy feeds images to a 4-D input (N, C, H, W or N, H, W, C); this one is {dims}"
        )
    if dtype not in FLOATS:
        raise InputError(f"{source}: the image input is {dtype}; aa-deploy feeds float32 or float16 images")
    known = [d if isinstance(d, int) and d > 0 else None for d in dims]
    fits = [name for name, axis in (("NCHW", 1), ("NHWC", 3)) if known[axis] in CHANNELS]
    if layout is None:
        if not fits and known[1] is None and known[3] is None:
            fits = ["NCHW"]
        if not fits:
            raise InputError(
                f"{source}: input dims {dims} hold neither 1 nor 3 channels on axis 1 (NCHW) or axis 3 (NHWC); "
                "aa-deploy feeds RGB or grayscale images"
            )
        layout = fits[0]  # both fit only for 1- or 3-pixel-wide images: NCHW, unless --layout says otherwise
    channel_axis, spatial = (1, (2, 3)) if layout == "NCHW" else (3, (1, 2))
    channels = known[channel_axis]
    if channels is None:
        channels = 3
    elif channels not in CHANNELS:
        raise InputError(f"{source}: in {layout}, input dims {dims} have {channels} channels; aa-deploy feeds 1 or 3")
    height, width = (known[a] for a in spatial)
    return InputFormat(layout, channels, height, width, dtype)


def read(path: str | os.PathLike, layout: str | None = None) -> InputFormat:
    """The format of the single image input of the model at `path`."""
    _, dims, dtype = model_io.input_spec(path, with_type=True)
    return from_dims(dims, dtype, layout, str(path))
