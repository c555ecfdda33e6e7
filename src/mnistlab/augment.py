"""Per-image random affine augmentation of a whole batch in one `grid_sample` call.

Every named pipeline is one affine map per image (rotation, shift, zoom about the centre),
so a batch costs one `affine_grid` + `grid_sample` on whatever device it is on, instead of
a PIL round trip per image in DataLoader workers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mnistlab.stress import distort

# name -> (max rotation in degrees, max shift as a fraction of the side, zoom probability, zoom)
AUGMENTATIONS: dict[str, tuple[float, float, float, float] | None] = {
    # Rotation up to 10 degrees and shift up to 10% each way: the original project's documented
    # pipeline, RandomRotation(10) + RandomAffine(translate=(0.1, 0.1)).
    "rotate_shift": (10.0, 0.1, 0.0, 1.0),
    # Rotation up to 15 degrees and, for one image in ten, a zoom into the central 22 px: what the
    # original notebooks ran, p=0.1 CenterCrop(22) + Resize(28), RandomRotation(15).
    "rotate_zoom": (15.0, 0.0, 0.1, 22 / 28),
    # Not an affine map: the stress test set's kind of distortion (stress.py: rotation, zoom,
    # shift, elastic warp, thicker or thinner strokes), drawn afresh for every image of a batch.
    "distort": None,
    # Half of each batch distorted so, the other half under rotate_shift: robustness to the
    # stress kind of digit with less of the clean accuracy given up.
    "half_distort": None,
    "none": None,
}


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


def augment(images: torch.Tensor, name: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply the named pipeline of `AUGMENTATIONS` to a float batch in [0, 1]."""
    if name == "distort":
        return distort(images, generator)
    if name == "half_distort":
        distorted = torch.rand(len(images), generator=generator, device=images.device) < 0.5
        affine = random_affine(images, *AUGMENTATIONS["rotate_shift"], generator=generator)
        return torch.where(distorted.view(-1, 1, 1, 1), distort(images, generator), affine)
    params = AUGMENTATIONS[name]
    return images if params is None else random_affine(images, *params, generator=generator)
