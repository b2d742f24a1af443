"""The trained model and real images that ship with aa-deploy (see assets/README.md).

The CIFAR network's module (and with it torch) is imported inside the two functions that need it:
`aa_deploy.verification.drift`, convert's check of moved outputs, reads the bundled photos through here, and the
graph pass and that check import without torch when used as a library."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from aa_deploy.common.errors import InputError
from aa_deploy.common.input_format import InputFormat

ASSETS = Path(__file__).parent / "assets"
RESNET20_WEIGHTS = ASSETS / "resnet20-12fca82f.th"
PHOTOS = ASSETS / "photos"
CIFAR_TEST = ASSETS / "cifar10_test100.csv"
CIFAR10, PHOTO_SET = "bundled:cifar10", "bundled:photos"  # the image sources commands take without --images


def default_images(size: int, preprocessed: bool = False) -> str:
    """The bundled images a command measures on when none are given: the CIFAR-10 test images for a 32-px
    model fed as they are, else the photos (cropped, or resized and cropped by the user's preprocessing)."""
    return CIFAR10 if size == 32 and not preprocessed else PHOTO_SET


def cifar_test_images() -> tuple[np.ndarray, np.ndarray]:
    """The 100 bundled CIFAR-10 test images as uint8 NHWC (100, 32, 32, 3) and their labels."""
    rows = np.loadtxt(CIFAR_TEST, delimiter=",", dtype=np.int64)
    return rows[:, 1:].reshape(-1, 32, 32, 3).astype(np.uint8), rows[:, 0]


def cifar_normalize(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> normalized float32 NCHW, as the CIFAR ResNet checkpoints expect."""
    from aa_deploy.common.models.cifar_resnet import MEAN, STD

    x = images.astype(np.float32) / 255.0
    x = (x - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def cifar_feed(fmt: InputFormat) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 NHWC CIFAR images -> the model's input as `fmt` takes them (layout, float type); refused in
    one line for a 1-channel input, which these RGB images cannot feed."""
    if fmt.channels != 3:
        raise InputError("the bundled CIFAR-10 images are RGB, and this model takes 1-channel images (give --images)")
    return lambda images: fmt.feed(cifar_normalize(images))


def resnet20():
    """The bundled trained CIFAR-10 ResNet-20 (eval mode)."""
    from aa_deploy.common.models.cifar_resnet import cifar_resnet

    return cifar_resnet(20, RESNET20_WEIGHTS)


def photo_crops(count: int, size: int, seed: int = 0) -> np.ndarray:
    """`count` random square crops of the six bundled public-domain photos, resized to `size` px and
    flipped at random: uint8 NHWC. Unlabeled calibration images that may ship with the project."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = [Image.open(p).convert("RGB") for p in sorted(PHOTOS.glob("*.jpg"))]
    out = np.empty((count, size, size, 3), np.uint8)
    for i in range(count):
        photo = photos[i % len(photos)]
        side = int(rng.integers(max(8, size // 2), min(photo.size) // 2))
        x, y = (int(rng.integers(0, d - side)) for d in photo.size)
        crop = photo.crop((x, y, x + side, y + side)).resize((size, size), Image.BILINEAR)
        out[i] = np.asarray(crop)[:, ::-1] if rng.random() < 0.5 else np.asarray(crop)
    return out
