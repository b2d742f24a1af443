"""The views calibration trains and scores on: shifted copies of decoded images (uint8 or float NHWC).

pad_crop      random pad-and-crop shifts of the image itself (zero padding)
roll          random circular shifts (the content wraps around)
canvas_crops  crops of a canvas, the image resized larger than the model's view (the resize before the
              centre crop), at random offsets, mirrored at random
centre        the canvas's centre crop: the view the model gets in use
"""

from __future__ import annotations

import numpy as np

from aa_deploy.common.input_format import Size, hw
from aa_deploy.consistency.protocols import roll_each


def pad_crop(images: np.ndarray, shift: int, rng: np.random.Generator) -> np.ndarray:
    """Random pad-and-crop shifts within +-shift pixels (zero padding); NHWC, any dtype."""
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (shift, shift), (shift, shift), (0, 0)))
    offsets = rng.integers(0, 2 * shift + 1, size=(n, 2))
    return np.stack([padded[i, y : y + h, x : x + w] for i, (y, x) in enumerate(offsets)])


def roll(images: np.ndarray, shift: int, rng: np.random.Generator) -> np.ndarray:
    """Random circular shifts within +-shift pixels (the content wraps around); NHWC, any dtype."""
    return roll_each(images, rng.integers(-shift, shift + 1, size=(len(images), 2)))


def canvas_crops(canvases: np.ndarray, size: Size, rng: np.random.Generator, mirror: bool = True) -> np.ndarray:
    """A crop of `size` (one side, or (height, width)) of each NHWC canvas at a random offset, mirrored
    left-right with probability 1/2 when `mirror`."""
    n, h, w, _ = canvases.shape
    sh, sw = hw(size)
    ys, xs = rng.integers(0, h - sh + 1, n), rng.integers(0, w - sw + 1, n)
    crops = np.stack([c[y : y + sh, x : x + sw] for c, y, x in zip(canvases, ys, xs)])
    if mirror:
        flip = rng.random(n) < 0.5
        crops[flip] = crops[flip, :, ::-1]
    return crops


def centre(canvases: np.ndarray, span: int) -> np.ndarray:
    """The centre crop of each canvas, `span` px smaller: the view the model gets in use."""
    if span == 0:
        return canvases
    a = span // 2
    return canvases[:, a : a + canvases.shape[1] - span, a : a + canvases.shape[2] - span]
