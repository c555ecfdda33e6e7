"""The stress test set: MNIST's official test digits as people really write them.

Each test image gets its own fixed distortion, drawn from one seeded generator so the set is
the same on every machine and every run: a rotation up to 20 degrees, a zoom between 0.85 and
1.15, a shift up to 2 pixels, a mild elastic warp (a smooth random displacement of about a
pixel), and a stroke made a pixel thicker (for a third of the digits) or thinner (another
third). Rotation stays well short of turning a 6 into a 9, so every label still holds. The
set is only ever reported; nothing is chosen on it (choose on a stressed copy of the
validation split: `stress(val_images, seed=...)` with another seed).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SEED = 20_261_126  # the stress test set's own seed: fixed, so figures from any run compare
VAL_SEED = 1  # the stressed copy of the validation split, for choosing (never SEED's test set)
ROTATION, ZOOM, SHIFT, WARP = 20.0, 0.15, 2 / 28, 0.08  # degrees, +-fraction, fraction of side, grid units


def stress(images: torch.Tensor, seed: int = SEED) -> torch.Tensor:
    """uint8 [N, 28, 28] -> the same digits distorted, uint8 [N, 28, 28], one distortion each."""
    x = distort(images.unsqueeze(1).float() / 255, torch.Generator().manual_seed(seed))
    return (x[:, 0] * 255).round().clamp(0, 255).to(torch.uint8)


def distort(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Float [N, 1, 28, 28] in [0, 1] -> each image under its own random distortion of the kind
    above, on the batch's device (`data.augment=distort` trains on fresh ones every step)."""
    n, device = len(x), x.device

    def uniform(*shape):  # in [-1, 1)
        return torch.rand(*shape, generator=generator, device=device) * 2 - 1

    angle, zoom = uniform(n) * math.radians(ROTATION), 1 + uniform(n) * ZOOM
    shift = uniform(n, 2) * (2 * SHIFT)  # grid coordinates span 2 units per side
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    warp = F.interpolate(uniform(n, 2, 4, 4) * WARP, size=x.shape[-2:], mode="bicubic", align_corners=False)
    grid = grid + warp.permute(0, 2, 3, 1).to(x.dtype)
    x = F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)
    stroke = torch.randint(0, 3, (n,), generator=generator, device=device).view(n, 1, 1, 1)
    thicker = F.max_pool2d(x, 3, stride=1, padding=1)
    thinner = -F.max_pool2d(F.pad(-x, (0, 1, 0, 1), value=0.0), 2, stride=1)  # a 2x2 erosion
    return torch.where(stroke == 1, thicker, torch.where(stroke == 2, thinner, x))
