"""A photo, scan or drawing of one digit -> the 28x28 image MNIST would have made of it.

MNIST digits are light strokes on a black field, fitted into 20x20 pixels keeping their aspect
ratio and centred by mass in 28x28. What people upload is a grey page under uneven light, with
sensor noise, a pen thicker or thinner than MNIST's, dark or light ink, a transparent
background. So the steps are: flatten the alpha channel; fit the paper's brightness as a smooth
surface (robust to the ink) and keep what differs from it; decide the ink's polarity from which
way it differs; drop the noise; bring the stroke to MNIST's width; crop, resize and centre.
`predict.py` and the demo page both call `mnist_style`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from mnistlab import MnistlabError
from mnistlab.data import standardize

# Stroke width over the digit's box side in MNIST's test digits: 5th percentile 0.06, median
# 0.09, 95th 0.14. Outside (low, high) a stroke is brought to `typical`.
STROKE = (0.06, 0.16, 0.12)
WORKING_SIDE = 160  # larger pictures are reduced to this first: plenty for a 20 px digit, and fast
MAX_PIXELS = 50_000_000  # a 7,000 x 7,000 scan; larger is refused before it is decoded


class NoDigit(MnistlabError):
    """The picture holds no ink to read: blank, or paper with nothing on it."""

    def __init__(self):
        super().__init__("found no digit in the image (it is blank); draw or pass an image with one digit")


def load_image(path: str | Path) -> Image.Image:
    """The still image in a file, upright as its EXIF orientation says (a phone stores a photo
    taken sideways as it left the sensor, plus a tag), alpha kept; an animation or a non-image is
    a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise MnistlabError(f"image {path} does not exist; pass image=PATH to a PNG or JPEG")
    try:
        with warnings.catch_warnings():  # PIL's own size warning: the check below says it in one line
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
        with image:
            if image.width * image.height > MAX_PIXELS:
                raise MnistlabError(
                    f"image {path} is {image.width}x{image.height}; scale it below {MAX_PIXELS:,} pixels"
                )
            if getattr(image, "n_frames", 1) > 1:
                raise MnistlabError(
                    f"image {path} has {image.n_frames} frames (an animation); pass a single still image"
                )
            image.load()
            return ImageOps.exif_transpose(image)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise MnistlabError(
            f"cannot read {path} as an image ({type(e).__name__}); pass a PNG or JPEG"
        ) from None


def flatten_alpha(image: Image.Image) -> Image.Image:
    """Grey image of `image`, transparent parts painted in the colour opposite to the ink.

    A transparent pixel keeps whatever colour it had, often black; a black digit on a
    transparent PNG would otherwise be black on black."""
    if "A" not in image.getbands() and "transparency" not in image.info:
        return image.convert("L")
    rgba = image.convert("RGBA")
    alpha = np.asarray(rgba.getchannel("A"), np.float32) / 255
    grey = np.asarray(rgba.convert("L"), np.float32) / 255
    opaque = alpha > 0.5
    ink_is_dark = not opaque.any() or grey[opaque].mean() < 0.5
    paper = 1.0 if ink_is_dark else 0.0
    flat = grey * alpha + paper * (1 - alpha)
    return Image.fromarray(np.uint8(np.round(flat * 255)), "L")


def _paper(pixels: np.ndarray) -> tuple[np.ndarray, float]:
    """The paper's brightness as a quadratic surface, and the noise around it (robust standard
    deviation). The first fit is to the image's outer frame, where a digit rarely is; each refit
    takes every pixel close to the surface, leaving the ink out however much of the image it covers."""
    h, w = pixels.shape
    ys, xs = np.mgrid[:h, :w]
    frame = (np.minimum(ys, h - 1 - ys) < max(1, h // 10)) | (np.minimum(xs, w - 1 - xs) < max(1, w // 10))
    ys, xs = ys / max(h - 1, 1) * 2 - 1, xs / max(w - 1, 1) * 2 - 1
    basis = np.stack([np.ones_like(xs), xs, ys, xs * xs, ys * ys, xs * ys], -1).reshape(-1, 6)
    values = pixels.reshape(-1)
    step = max(1, values.size // 4_000)  # a subsample is plenty for six coefficients
    sample, sample_values, keep = basis[::step], values[::step], frame.reshape(-1)[::step]
    for _ in range(5):
        kept = sample[keep]  # least squares by the 6x6 normal equations: fast and well posed here
        coef = np.linalg.solve(kept.T @ kept + 1e-6 * np.eye(6), kept.T @ sample_values[keep])
        residual = sample_values - sample @ coef
        spread = 1.4826 * np.median(np.abs(residual[keep] - np.median(residual[keep])))
        keep = np.abs(residual) <= 2.5 * spread + 0.02
    return (basis @ coef).reshape(h, w), float(spread)


def _stroke_width(ink: np.ndarray) -> float:
    """Mean width of the strokes in a boolean mask: area over half the outline length."""
    edges = (ink[1:, :] != ink[:-1, :]).sum() + (ink[:, 1:] != ink[:, :-1]).sum()
    return 2 * ink.sum() / max(edges, 1)


def _to_stroke_width(digit: np.ndarray) -> np.ndarray:
    """Strokes thinner or thicker than nearly all of MNIST's brought to its typical width (grey max
    or min filter); widths MNIST itself has are left alone."""
    side = max(digit.shape)
    width = _stroke_width(digit > 0.5 * digit.max()) / side
    if STROKE[0] <= width <= STROKE[1]:
        return digit
    size = min(int(round(abs(STROKE[2] - width) * side)) // 2 * 2 + 1, 15)  # odd, for PIL's filters
    if size < 3:
        return digit
    grow = ImageFilter.MaxFilter if width < STROKE[0] else ImageFilter.MinFilter
    image = Image.fromarray(np.uint8(digit / digit.max() * 255)).filter(grow(size))
    return np.asarray(image, np.float32) / 255


def mnist_style(image: Image.Image) -> torch.Tensor:
    """An image of one digit -> [1, 1, 28, 28] normalised tensor, MNIST-style."""
    grey = flatten_alpha(image)
    if max(grey.size) > WORKING_SIDE:
        grey.thumbnail((WORKING_SIDE, WORKING_SIDE), Image.BOX)
    pixels = np.asarray(grey, np.float32) / 255
    paper, noise = _paper(pixels)
    difference = pixels - paper
    darker, lighter = -np.percentile(difference, 0.5), np.percentile(difference, 99.5)
    ink = -difference if darker > lighter else difference  # the ink is what stands out most
    ink = np.clip(ink - 3 * noise, 0, None)  # what noise alone makes, gone
    if min(pixels.shape) >= 56:  # isolated noisy pixels out; MNIST-sized strokes are left alone
        ink = np.asarray(Image.fromarray(ink).filter(ImageFilter.MedianFilter(3)), np.float32)
    if ink.max() < 0.08:
        raise NoDigit
    ink = np.clip(ink / np.percentile(ink[ink > 0], 99), 0, 1)  # full contrast, as MNIST's strokes
    rows, cols = np.where((ink > 0.3).any(1))[0], np.where((ink > 0.3).any(0))[0]
    digit = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    digit = _to_stroke_width(digit)
    scale = 20 / max(digit.shape)
    size = (max(1, round(digit.shape[1] * scale)), max(1, round(digit.shape[0] * scale)))
    digit = np.asarray(Image.fromarray(np.uint8(digit * 255)).resize(size, Image.LANCZOS), np.float32) / 255
    field = np.zeros((28, 28), np.float32)
    ys, xs = np.mgrid[: digit.shape[0], : digit.shape[1]]
    mass = digit.sum()
    if mass == 0:
        raise NoDigit
    cy, cx = (ys * digit).sum() / mass, (xs * digit).sum() / mass
    top, left = int(round(14 - cy)), int(round(14 - cx))  # MNIST's mean centre of mass: (14.0, 14.0)
    top, left = min(max(top, 0), 28 - digit.shape[0]), min(max(left, 0), 28 - digit.shape[1])
    field[top : top + digit.shape[0], left : left + digit.shape[1]] = digit
    return standardize(torch.from_numpy(field)).view(1, 1, 28, 28)
