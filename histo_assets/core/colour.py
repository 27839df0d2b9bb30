"""Mean CIE Lab colour of image sets: the stain test of whether generated tiles look like their class.

H&E and IHC differ first of all in colour (eosin pink and haematoxylin blue against DAB brown),
and Lab is built so that Euclidean distance roughly follows perceived colour difference, so the
distance between two sets' mean Lab colours says whether generated tiles took on the right stain
without any learned feature extractor. Conversion is the sRGB (IEC 61966-2-1) to XYZ (D65) to
CIELAB formula, written out in numpy so that the numbers do not move with a library's version.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

# Linear sRGB to CIE XYZ, D65 white (IEC 61966-2-1).
SRGB_TO_XYZ = np.array([
    [0.4124564, 0.3575761, 0.1804375],
    [0.2126729, 0.7151522, 0.0721750],
    [0.0193339, 0.1191920, 0.9503041],
])
# D65 reference white as the rows of SRGB_TO_XYZ sum to it, so pure white maps to L=100, a=b=0 exactly.
D65_WHITE = SRGB_TO_XYZ.sum(axis=1)
# CIELAB's linear segment near black: (6/29)^3 and the slope that joins it to the cube root.
_EPSILON = (6 / 29) ** 3
_SLOPE = (29 / 6) ** 2 / 3


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """Lab of 8-bit sRGB values in the last axis (shape ..., 3), as float64 L in [0, 100]."""
    array = np.asarray(rgb)
    if array.shape[-1] != 3:
        raise ValueError(f"expected RGB values in the last axis, got shape {array.shape}")
    unit = array.astype(np.float64) / 255.0
    linear = np.where(unit <= 0.04045, unit / 12.92, ((unit + 0.055) / 1.055) ** 2.4)
    xyz = linear @ SRGB_TO_XYZ.T / D65_WHITE
    f = np.where(xyz > _EPSILON, np.cbrt(xyz), _SLOPE * xyz + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def _rgb_pixels(image: Image.Image | np.ndarray | Path | str) -> np.ndarray:
    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            return np.asarray(opened.convert("RGB")).reshape(-1, 3)
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB")).reshape(-1, 3)
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"images must be paths, PIL images or uint8 HxWx3 arrays, got {array.dtype} {array.shape}")
    return array.reshape(-1, 3)


def mean_lab(images: Iterable[Image.Image | np.ndarray | Path | str]) -> np.ndarray:
    """Mean Lab over every pixel of every image, so larger images weigh more, as pixels of the same stain should.

    Per-pixel Lab is averaged rather than the mean RGB converted: Lab is
    nonlinear, and a set of pink and brown tiles is not the colour of their
    mean RGB.
    """
    total, count = np.zeros(3), 0
    for image in images:
        lab = srgb_to_lab(_rgb_pixels(image))
        total += lab.sum(axis=0)
        count += len(lab)
    if count == 0:
        raise ValueError("no images to take the mean colour of")
    return total / count


def lab_distance(first: np.ndarray, second: np.ndarray) -> float:
    """CIE76 ΔE between two Lab colours: about 2.3 is a just noticeable difference."""
    return float(np.linalg.norm(np.asarray(first, dtype=np.float64) - np.asarray(second, dtype=np.float64)))
