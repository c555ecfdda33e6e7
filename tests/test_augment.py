"""The batched augmentation: per-image randomness, within its bounds, reproducible."""

from __future__ import annotations

import torch

from mnistlab.augment import augment, random_affine


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def centroid(images: torch.Tensor) -> torch.Tensor:
    """Centre of mass (x, y) of each image of [N, 1, H, W], in pixels from the image centre."""
    n, _, h, w = images.shape
    ys, xs = torch.meshgrid(torch.arange(h) - (h - 1) / 2, torch.arange(w) - (w - 1) / 2, indexing="ij")
    mass = images.sum(dim=(1, 2, 3))
    return torch.stack([(images[:, 0] * xs).sum((1, 2)) / mass, (images[:, 0] * ys).sum((1, 2)) / mass], 1)


def test_each_image_in_a_batch_gets_its_own_transform():
    batch = torch.zeros(16, 1, 28, 28)
    batch[:, :, 10:18, 6:22] = 1.0
    out = augment(batch, "rotate_shift", generator=gen())
    flat = out.flatten(1)
    assert all(not torch.allclose(flat[0], flat[i]) for i in range(1, 16))


def test_shifts_stay_within_ten_percent_and_reach_it():
    dot = torch.zeros(512, 1, 28, 28)
    dot[:, :, 12:16, 12:16] = 1.0
    shift = centroid(random_affine(dot, degrees=0, translate=0.1, generator=gen()))
    assert shift.abs().max() <= 2.8 + 0.05  # 10% of 28 pixels
    assert shift.abs().max() > 2.5  # and the range is used, not a fraction of it


def test_rotation_angles_stay_within_bounds_and_reach_them():
    bar = torch.zeros(512, 1, 28, 28)
    bar[:, :, 13:15, 2:26] = 1.0  # horizontal
    out = random_affine(bar, degrees=10, translate=0.0, generator=gen())
    # Orientation of each image from its second moments.
    n, _, h, w = out.shape
    ys, xs = torch.meshgrid(torch.arange(h) - (h - 1) / 2, torch.arange(w) - (w - 1) / 2, indexing="ij")
    m = out[:, 0]
    mass = m.sum((1, 2))
    cxx, cyy, cxy = (
        (m * xs * xs).sum((1, 2)),
        (m * ys * ys).sum((1, 2)),
        (m * xs * ys).sum((1, 2)),
    )
    angle = torch.rad2deg(0.5 * torch.atan2(2 * cxy / mass, (cxx - cyy) / mass)).abs()
    assert angle.max() <= 10 + 0.5
    assert angle.max() > 8


def test_rotate_zoom_enlarges_about_one_image_in_ten():
    blob = torch.zeros(2000, 1, 28, 28)
    blob[:, :, 10:18, 10:18] = 1.0
    out = random_affine(blob, degrees=0, translate=0.0, zoom_prob=0.1, zoom=28 / 22, generator=gen())
    grown = out.sum((1, 2, 3)) > blob[0].sum() * 1.3  # area grows by (28/22)^2 = 1.62
    assert 0.07 < grown.float().mean() < 0.13


def test_same_generator_seed_gives_the_same_batch():
    batch = torch.rand(8, 1, 28, 28)
    assert torch.equal(augment(batch, "rotate_zoom", gen(3)), augment(batch, "rotate_zoom", gen(3)))
    assert not torch.equal(augment(batch, "rotate_zoom", gen(3)), augment(batch, "rotate_zoom", gen(4)))


def test_none_leaves_images_untouched():
    batch = torch.rand(4, 1, 28, 28)
    assert augment(batch, "none") is batch


def test_identity_parameters_reproduce_the_image():
    batch = torch.rand(4, 1, 28, 28)
    assert torch.allclose(random_affine(batch, degrees=0, translate=0), batch, atol=1e-5)
