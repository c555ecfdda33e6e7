"""The task behind `predict.py`: the digit in a photo or scan, prepared the way MNIST was.

MNIST digits are white on black, fitted into 20x20 pixels keeping their aspect ratio, and
placed in a 28x28 field so that their centre of mass is at the centre. An arbitrary image
gets the same treatment: grey, inverted if its background is light, cropped to the ink,
resized, centred by mass, then normalised like the training data.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mnistlab import MnistlabError, instantiate
from mnistlab.data import standardize
from mnistlab.module import load_classifier

MAX_PIXELS = 50_000_000  # a 7,000 x 7,000 scan; larger is refused before it is decoded


def load_image(path: str | Path) -> Image.Image:
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
            return image.convert("L")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise MnistlabError(
            f"cannot read {path} as an image ({type(e).__name__}); pass a PNG or JPEG"
        ) from None


def mnist_style(image: Image.Image) -> torch.Tensor:
    """A grey PIL image of one digit -> [1, 1, 28, 28] normalised tensor, MNIST-style."""
    pixels = np.asarray(image, dtype=np.float32) / 255
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    if np.median(border) > 0.5:  # dark ink on light paper: make it light on dark, as MNIST is
        pixels, border = 1 - pixels, 1 - border
    pixels = np.clip(pixels - np.median(border), 0, None)  # the background becomes 0
    if pixels.max() < 0.05:
        raise MnistlabError("found no digit in the image (it is blank); pass an image with one digit")
    ink = pixels > 0.2 * pixels.max()
    rows, cols = np.where(ink.any(1))[0], np.where(ink.any(0))[0]
    digit = pixels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    scale = 20 / max(digit.shape)
    size = (max(1, round(digit.shape[1] * scale)), max(1, round(digit.shape[0] * scale)))
    digit = np.asarray(Image.fromarray(np.uint8(digit / digit.max() * 255)).resize(size, Image.LANCZOS))
    digit = digit.astype(np.float32) / 255
    field = np.zeros((28, 28), np.float32)
    ys, xs = np.mgrid[: digit.shape[0], : digit.shape[1]]
    mass = digit.sum()
    cy, cx = (ys * digit).sum() / mass, (xs * digit).sum() / mass
    top, left = int(round(14 - cy)), int(round(14 - cx))  # MNIST's mean centre of mass: (14.0, 14.0)
    top, left = min(max(top, 0), 28 - digit.shape[0]), min(max(left, 0), 28 - digit.shape[1])
    field[top : top + digit.shape[0], left : left + digit.shape[1]] = digit
    return standardize(torch.from_numpy(field)).view(1, 1, 28, 28)


def load_network(ckpt_path: str | None, weights: str | Path, model_cfg) -> torch.nn.Module:
    """A checkpoint's network, or else a released state_dict in the architecture of `model_cfg`."""
    if ckpt_path:
        return load_classifier(ckpt_path).net.eval()
    weights = Path(weights)
    if not weights.is_file():
        raise MnistlabError(f"no released weights at {weights}; pass ckpt_path=PATH to a checkpoint")
    net = instantiate(model_cfg)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (a truncated file, a pickle of something else, text)
        raise MnistlabError(
            f"{weights} is not a weights file ({type(e).__name__}); pass weights=<a .pt from weights/> "
            "or ckpt_path=<a checkpoint>"
        ) from None
    try:
        net.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:  # other names or shapes: another architecture
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise MnistlabError(
            f"{weights} is not a state_dict of this model ({first[:120]}); "
            "pass model=<the weights' architecture> or ckpt_path=<a checkpoint>"
        ) from None
    return net.eval()


def predict(cfg) -> dict:
    """Read and prepare the image first (the input most likely to be wrong), then the model."""
    image = mnist_style(load_image(cfg.image))
    net = load_network(cfg.get("ckpt_path"), cfg.weights, cfg.model)
    with torch.no_grad():
        probabilities = torch.softmax(net(image), dim=1)[0]
    result = {
        "digit": int(probabilities.argmax()),
        "probabilities": [round(float(p), 4) for p in probabilities],
    }
    print(json.dumps({"image": str(cfg.image), **result}))
    return result
