"""Pictures of digits as people upload or draw them, made reproducibly: photo-like pictures of
real MNIST digits, and a 3 drawn on the demo page's canvas.

A digit's stroke is taken from an official test image (upscaled and thresholded: the pen's path),
drawn thicker or thinner, in dark or light ink, off centre on a larger sheet whose brightness
runs in a gradient, with sensor noise."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


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


# A "3" as a person draws it: two bows, as fractions of the canvas (x, y).
THREE = [
    [(0.30, 0.22), (0.42, 0.15), (0.58, 0.15), (0.68, 0.24), (0.66, 0.36), (0.55, 0.46), (0.45, 0.48)],
    [(0.45, 0.48), (0.60, 0.52), (0.70, 0.62), (0.70, 0.74), (0.60, 0.84), (0.44, 0.86), (0.30, 0.80)],
]


def drawn_three(pen: int = 24, side: int = 280) -> Image.Image:
    """THREE in black on a white canvas, as the page's sketchpad sends it."""
    canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    for stroke in THREE:
        points = [(x * side, y * side) for x, y in stroke]
        ImageDraw.Draw(canvas).line(points, fill=(0, 0, 0, 255), width=pen, joint="curve")
    return canvas
