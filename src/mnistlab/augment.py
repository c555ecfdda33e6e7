"""Per-image random augmentation of a whole batch, on whatever device it is on.

Each named pipeline is a function of the batch: an affine map per image (rotation, shift, zoom
about the centre) costs one `affine_grid` + `grid_sample` instead of a PIL round trip per image
in DataLoader workers; `distort` adds the stress set's warp and stroke width.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from mnistlab.stress import distort


def random_affine(
    images: torch.Tensor,
    degrees: float,
    translate: float,
    zoom_prob: float = 0.0,
    zoom: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Rotate each image of [N, C, H, W] by its own angle in [-degrees, degrees], shift it by up
    to `translate` of its side each way, and with probability `zoom_prob` sample its centre at
    scale `zoom`. Uncovered pixels are 0 (black, as in MNIST before normalisation)."""
    n, device = images.shape[0], images.device

    def uniform(*shape):  # in [-1, 1)
        return torch.rand(*shape, generator=generator, device=device) * 2 - 1

    angle = uniform(n) * math.radians(degrees)
    shift = uniform(n, 2) * (2 * translate)  # grid coordinates span 2 units per side
    scale = torch.ones(n, device=device)
    if zoom_prob > 0:
        zoomed = torch.rand(n, generator=generator, device=device) < zoom_prob
        scale = torch.where(zoomed, torch.full_like(scale, zoom), scale)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def half_distort(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Half of the batch (a coin per image) distorted as the stress set is, the rest rotate_shift:
    robustness to that kind of digit with less of the clean accuracy given up. Both are drawn
    for the whole batch (a few ms beside the network's step), which keeps the reported runs'
    random draws."""
    distorted = torch.rand(len(images), generator=generator, device=images.device) < 0.5
    affine = rotate_shift(images, generator=generator)
    return torch.where(distorted.view(-1, 1, 1, 1), distort(images, generator), affine)


# Rotation up to 10 degrees and shift up to 10% each way: the original project's documented
# pipeline, RandomRotation(10) + RandomAffine(translate=(0.1, 0.1)).
rotate_shift = partial(random_affine, degrees=10.0, translate=0.1)

AUGMENTATIONS: dict[str, Callable[..., torch.Tensor] | None] = {
    "rotate_shift": rotate_shift,
    # Rotation up to 15 degrees and, for one image in ten, a zoom into the central 22 px: what the
    # original notebooks ran, p=0.1 CenterCrop(22) + Resize(28), RandomRotation(15).
    "rotate_zoom": partial(random_affine, degrees=15.0, translate=0.0, zoom_prob=0.1, zoom=22 / 28),
    # The stress test set's kind of distortion (stress.py: rotation, zoom, shift, elastic warp,
    # thicker or thinner strokes), drawn afresh for every image of a batch.
    "distort": distort,
    "half_distort": half_distort,
    "none": None,
}


# Test-time augmentation (eval.py tta=true): each test image as it is, shifted one pixel each way,
# and rotated 5 degrees each way, as (degrees, right, down) in pixels; the softmaxes are averaged.
TTA_VIEWS = ((0, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1), (5, 0, 0), (-5, 0, 0))


def fixed_affine(images: torch.Tensor, degrees: float, right: float, down: float) -> torch.Tensor:
    """Every image of [N, C, H, W] rotated by `degrees` and moved `right` and `down` pixels
    (uncovered pixels 0, as in MNIST before normalisation)."""
    n, _, height, width = images.shape
    cos, sin = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    # affine_grid maps each output pixel to where it samples the input: a move is its negative
    row = [[cos, -sin, -2 * right / width], [sin, cos, -2 * down / height]]
    theta = torch.tensor(row, dtype=images.dtype, device=images.device).expand(n, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def tta_views(images: torch.Tensor) -> list[torch.Tensor]:
    """The TTA_VIEWS of a float batch in [0, 1], the untouched batch first."""
    return [images, *(fixed_affine(images, *view) for view in TTA_VIEWS[1:])]


def augment(images: torch.Tensor, name: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply the named pipeline of `AUGMENTATIONS` to a float batch in [0, 1]."""
    pipeline = AUGMENTATIONS[name]
    return images if pipeline is None else pipeline(images, generator=generator)
