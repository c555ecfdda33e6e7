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


def affine(
    images: torch.Tensor,
    angle: torch.Tensor,
    zoom: torch.Tensor | float,
    shift: torch.Tensor,
    warp: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each image of [N, C, H, W] rotated by its `angle` (radians) and magnified by its `zoom`
    about its centre, shifted by its `shift` ([N, 2] in grid units, 2 per side), and displaced
    by `warp` ([N, H, W, 2] grid units) if given: one `affine_grid` + `grid_sample` for the
    whole batch. Uncovered pixels are 0 (black, as in MNIST before normalisation)."""
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    if warp is not None:
        grid = grid + warp.to(images.dtype)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def uniform(n: int, *shape: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """[n, *shape] uniform draws in [-1, 1)."""
    return torch.rand(n, *shape, generator=generator, device=device) * 2 - 1


def random_affine(
    images: torch.Tensor,
    degrees: float,
    translate: float,
    zoom_prob: float = 0.0,
    zoom: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Rotate each image of [N, C, H, W] by its own angle in [-degrees, degrees], shift it by up
    to `translate` of its side each way, and with probability `zoom_prob` magnify it by `zoom`."""
    n, device = images.shape[0], images.device
    angle = uniform(n, generator=generator, device=device) * math.radians(degrees)
    shift = uniform(n, 2, generator=generator, device=device) * (2 * translate)
    scale = torch.ones(n, device=device)
    if zoom_prob > 0:
        zoomed = torch.rand(n, generator=generator, device=device) < zoom_prob
        scale = torch.where(zoomed, torch.full_like(scale, zoom), scale)
    return affine(images, angle, scale, shift)


# The stress set's distortion (stress.py): rotation up to 20 degrees, zoom within +-15%, shift
# up to 2 pixels, an elastic warp of about a pixel, a stroke a pixel thicker or thinner.
ROTATION, ZOOM, SHIFT, WARP = 20.0, 0.15, 2 / 28, 0.08  # degrees, +-fraction, fraction of side, grid units


def distort(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Float [N, 1, 28, 28] in [0, 1] -> each image under its own random distortion of the kind
    above, on the batch's device (`data.augment=distort` trains on fresh ones every step)."""
    n, device = len(x), x.device
    angle = uniform(n, generator=generator, device=device) * math.radians(ROTATION)
    zoom = 1 + uniform(n, generator=generator, device=device) * ZOOM
    shift = uniform(n, 2, generator=generator, device=device) * (2 * SHIFT)
    warp = uniform(n, 2, 4, 4, generator=generator, device=device) * WARP  # a smooth field, upsampled
    warp = F.interpolate(warp, size=x.shape[-2:], mode="bicubic", align_corners=False)
    x = affine(x, angle, zoom, shift, warp.permute(0, 2, 3, 1))
    stroke = torch.randint(0, 3, (n,), generator=generator, device=device).view(n, 1, 1, 1)
    thicker = F.max_pool2d(x, 3, stride=1, padding=1)
    thinner = -F.max_pool2d(F.pad(-x, (0, 1, 0, 1), value=0.0), 2, stride=1)  # a 2x2 erosion
    return torch.where(stroke == 1, thicker, torch.where(stroke == 2, thinner, x))


def half_distort(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Half of the batch (a coin per image) distorted as the stress set is, the rest rotate_shift:
    robustness to that kind of digit with less of the clean accuracy given up. Both are drawn for
    the whole batch (a few ms beside the network's step), so the random stream does not depend
    on which images the coin picked."""
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
    "rotate_zoom": partial(random_affine, degrees=15.0, translate=0.0, zoom_prob=0.1, zoom=28 / 22),
    # The stress test set's kind of distortion, drawn afresh for every image of a batch.
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
