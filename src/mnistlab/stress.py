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

import torch

from mnistlab.augment import distort

SEED = 20_261_126  # the stress test set's own seed: fixed, so figures from any run compare
VAL_SEED = 1  # the stressed copy of the validation split, for choosing (never SEED's test set)


def stress(images: torch.Tensor, seed: int = SEED) -> torch.Tensor:
    """uint8 [N, 28, 28] -> the same digits distorted, uint8 [N, 28, 28], one distortion each."""
    x = distort(images.unsqueeze(1).float() / 255, torch.Generator().manual_seed(seed))
    return (x[:, 0] * 255).round().clamp(0, 255).to(torch.uint8)
