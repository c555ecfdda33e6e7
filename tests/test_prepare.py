"""MNIST-style preparation of what people really upload, read by the released gap_cnn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from photos import drawn_three, photo
from PIL import Image, ImageDraw, ImageFont

from conftest import ROOT
from mnistlab import MnistlabError
from mnistlab.data import standardize, to_unit
from mnistlab.predict import load_network
from mnistlab.prepare import load_image, mnist_style


@pytest.fixture(scope="module")
def released():
    model = OmegaConf.load(ROOT / "conf" / "model" / "gap_cnn.yaml")
    net = load_network(None, ROOT / "weights" / "gap_cnn.pt", model)

    def read(image: Image.Image) -> int:
        with torch.no_grad():
            return int(net(mnist_style(image)).argmax())

    read.net = net
    return read


def similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float(a @ b / (a.norm() * b.norm()))


def test_an_mnist_digit_comes_back_almost_unchanged(real_test_digits):
    for image in real_test_digits[0][:8]:
        prepared = mnist_style(Image.fromarray(image.numpy()))
        assert similarity(prepared, standardize(to_unit(image[None]))) > 0.95


def test_a_large_dark_on_light_digit_is_inverted_resized_and_centred(real_test_digits):
    for image in real_test_digits[0][:8]:
        big = Image.fromarray(255 - image.numpy()).resize((100, 100), Image.BICUBIC)  # black ink, white paper
        padded = Image.new("L", (160, 130), 255)
        padded.paste(big, (50, 5))  # off centre, on a wider sheet
        assert similarity(mnist_style(padded), standardize(to_unit(image[None]))) > 0.8


PHOTOS = {  # photo() settings: each on a sheet lit in a gradient from grey 140 to 220
    "gradient": {},
    "gradient and noise": {"noise": 12},
    "thick pen": {"pen": 9},
    "thin pen": {"pen": -5},
    "light ink on dark paper": {"dark_ink": False, "noise": 6},
    "off centre": {"offset": (0.2, -0.2)},
    "all at once": {"noise": 10, "pen": 7, "offset": (-0.15, 0.2)},
    "a small photo": {"side": 60, "noise": 8},
}


@pytest.mark.parametrize("kind", PHOTOS)
def test_photo_like_digits_are_read_right(kind, released, real_test_digits):
    """20 real test digits as photos of handwriting: at most one wrong (the released model reads
    98.5-100% of such sets; a preparation that ignores the paper's gradient reads most as one digit)."""
    images, labels = real_test_digits
    answers = [released(photo(d.numpy(), seed=i, **PHOTOS[kind])) for i, d in enumerate(images[:20])]
    truth = [int(label) for label in labels[:20]]
    wrong = [(i, a, t) for i, (a, t) in enumerate(zip(answers, truth, strict=True)) if a != t]
    assert len(wrong) <= 1, f"{kind}: (index, read, true) {wrong}"


def printed(digit: str, size: int = 200) -> Image.Image:
    """A printed digit (the bundled font) in dark ink on paper lit from grey 140 to 220, noisy."""
    paper = np.linspace(140, 220, size)[None, :].repeat(size, 0)
    paper += np.random.default_rng(0).normal(0, 8, (size, size))
    image = Image.fromarray(np.uint8(np.clip(paper, 0, 255)))
    font = ImageFont.load_default(size=size * 0.6)
    ImageDraw.Draw(image).text((size * 0.3, size * 0.15), digit, fill=40, font=font)
    return image


@pytest.mark.parametrize("digit", "2345679")
def test_a_printed_digit_on_a_lighting_gradient_is_read(digit, released):
    """Printed digits on paper lit unevenly (grey 140 -> 220): the gradient is paper, not ink."""
    assert released(printed(digit)) == int(digit)


def test_a_dark_digit_on_a_transparent_png_is_read(released, tmp_path):
    image = Image.new("RGBA", (100, 100), (0, 0, 0, 0))  # transparent black: black ink vanishes in "L"
    ImageDraw.Draw(image).text((25, 0), "7", fill=(0, 0, 0, 255), font=ImageFont.load_default(size=90))
    image.save(tmp_path / "seven.png")
    assert released(load_image(tmp_path / "seven.png")) == 7


def test_a_phone_photo_stored_sideways_with_an_exif_orientation_is_read_upright(
    released, real_test_digits, tmp_path
):
    """A JPEG as a phone writes it when held sideways: the pixels rotated, EXIF Orientation 6
    ("rotate 90 degrees clockwise to show"). predict.py and the demo both read files by load_image."""
    from mnistlab.demo import reader

    images, labels = real_test_digits
    assert int(labels[0]) == 7
    upright = photo(images[0].numpy(), side=200, noise=3).crop((0, 0, 200, 160))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "sideways.jpg", quality=95, exif=exif)
    loaded = load_image(tmp_path / "sideways.jpg")
    assert loaded.size == upright.size == (200, 160)
    assert released(loaded) == 7
    ignoring_exif = Image.open(tmp_path / "sideways.jpg")  # the pixels as stored: a 7 on its side
    assert released(ignoring_exif) != 7
    answer, _, message = reader({"gap_cnn": released.net})(str(tmp_path / "sideways.jpg"), "gap_cnn")
    assert "**7**" in message and max(answer, key=answer.get) == "7"


def test_a_blank_image_and_a_flat_gradient_are_refused():
    for blank in (Image.new("L", (50, 50), 255), photo(np.zeros((28, 28), np.uint8), noise=5)):
        with pytest.raises(MnistlabError, match="found no digit"):
            mnist_style(blank)


def test_an_animation_is_refused_not_read_by_its_first_frame(tmp_path, real_test_digits):
    frames = [Image.fromarray(d.numpy()) for d in real_test_digits[0][:3]]
    frames[0].save(tmp_path / "digits.gif", save_all=True, append_images=frames[1:])
    with pytest.raises(MnistlabError, match="has 3 frames .* pass a single still image"):
        load_image(tmp_path / "digits.gif")


@pytest.mark.parametrize("pen", [10, 40])
def test_a_drawing_on_the_page_canvas_is_read_however_bold(pen, released):
    """A 3 in black on the demo's white 280x280 canvas: a bold pen covers a fifth of it, which
    a fit of the paper to all pixels would take for paper (and answer "no digit")."""
    assert released(drawn_three(pen)) == 3
