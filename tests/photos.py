"""Photo-like pictures of real MNIST digits: what people upload, made reproducibly.

A digit's stroke is taken from an official test image (upscaled and thresholded: the pen's path),
drawn thicker or thinner, in dark or light ink, off centre on a larger sheet whose brightness
runs in a gradient, with sensor noise."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter


def photo(
    digit: np.ndarray,
    side: int = 200,
    pen: int = 0,
    dark_ink: bool = True,
    gradient: tuple[int, int] = (140, 220),
    noise: float = 0.0,
    offset: tuple[float, float] = (0.0, 0.0),
    seed: int = 0,
) -> Image.Image:
    """`digit` (28x28 uint8 MNIST image) on a `side`-pixel sheet. `pen` > 0 thickens the stroke by
    a max filter of that size, < 0 thins it; `offset` moves the digit by a fraction of the sheet."""
    rng = np.random.default_rng(seed)
    box = side // 2
    stroke = Image.fromarray(digit).resize((box, box), Image.BICUBIC)
    stroke = stroke.point(lambda v: 255 if v > 100 else 0)
    if pen:
        stroke = stroke.filter((ImageFilter.MaxFilter if pen > 0 else ImageFilter.MinFilter)(abs(pen)))
    mask = np.zeros((side, side), np.float32)
    top = int(side / 4 + offset[0] * side)
    left = int(side / 4 + offset[1] * side)
    mask[top : top + box, left : left + box] = np.asarray(stroke, np.float32) / 255
    paper = np.linspace(gradient[0], gradient[1], side, dtype=np.float32)[None, :].repeat(side, 0)
    ink = 30.0 if dark_ink else 250.0
    if not dark_ink:
        paper = 255 - paper
    image = paper * (1 - mask) + ink * mask + rng.normal(0, noise, (side, side))
    return Image.fromarray(np.uint8(np.clip(image, 0, 255)))
