"""The demo page as people use it: the real Gradio server in a subprocess, called over HTTP by
gradio_client and driven in a real headless Chromium by Playwright."""

from __future__ import annotations

import re
import shutil

import pytest
from photos import THREE
from PIL import Image

from conftest import ROOT
from mnistlab.demo import BLANK, running

pytestmark = pytest.mark.integration  # a demo.py server in a subprocess


@pytest.fixture(scope="module")
def demo_url():
    """`python demo.py port=N` serving the released gap_cnn; stopped after the module's tests."""
    with running() as url:
        yield url


@pytest.fixture(scope="module")
def client(demo_url):
    from gradio_client import Client

    return Client(demo_url, verbose=False)


def test_the_predict_endpoint_reads_real_test_digits_over_http(client, real_test_digits, tmp_path):
    from gradio_client import handle_file

    images, labels = real_test_digits
    wrong = []
    for i, (image, label) in enumerate(zip(images[:20], labels[:20], strict=True)):
        Image.fromarray(image.numpy()).save(tmp_path / f"{i}.png")
        answer, seen, message = client.predict(handle_file(tmp_path / f"{i}.png"), api_name="/predict")
        digit = int(answer["label"])
        assert message.startswith(f"The model reads **{digit}**") and len(answer["confidences"]) == 10
        assert Image.open(seen).size == (224, 224)  # the 28x28 input it saw, enlarged
        wrong += [(i, digit, int(label))] if digit != label else []
    assert len(wrong) <= 1, wrong


def test_an_empty_canvas_asks_for_a_digit_and_a_non_image_gets_a_message(client, tmp_path):
    from gradio_client import handle_file

    Image.new("RGBA", (280, 280), (255, 255, 255, 255)).save(tmp_path / "canvas.png")
    canvas = {"background": None, "layers": [], "composite": handle_file(tmp_path / "canvas.png")}
    assert client.predict(canvas, api_name="/draw") == ({}, None, BLANK)
    (tmp_path / "notes.png").write_text("shopping list: milk, eggs")
    answer, seen, message = client.predict(handle_file(tmp_path / "notes.png"), api_name="/predict")
    assert (answer, seen) == ({}, None)
    assert message == "cannot read the upload as an image (UnidentifiedImageError); pass a PNG or JPEG"
    answer, _, _ = client.predict(
        handle_file(ROOT / "docs" / "demo" / "mnist-test-0000-7.png"), api_name="/predict"
    )
    assert answer["label"] == "7"  # and the server still answers


@pytest.mark.browser
def test_a_three_drawn_with_the_mouse_in_chromium_is_read_as_3(demo_url, tmp_path):
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    assert chromium, "no chromium on PATH; make test-browser installs Debian's"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(demo_url)
        page.get_by_role("button", name="Brush").click()  # as the page says: select the draw tool
        area = page.locator("#sketchpad canvas").first.bounding_box()
        side = 0.8 * min(area["width"], area["height"])  # the white drawing page, centred in the editor
        left, top = area["x"] + (area["width"] - side) / 2, area["y"] + (area["height"] - side) / 2
        for stroke in THREE:
            (x, y), *rest = stroke
            page.mouse.move(left + x * side, top + y * side)
            page.mouse.down()
            for x, y in rest:
                page.mouse.move(left + x * side, top + y * side, steps=8)
            page.mouse.up()
        page.locator("#read").click()
        message = page.locator("#message")
        message.filter(has_text="reads").wait_for(timeout=60_000)
        text = message.inner_text()
        page.screenshot(path=tmp_path / "demo.png", full_page=True)
        browser.close()
    assert re.search(r"reads (\d)", text).group(1) == "3", text
    assert (tmp_path / "demo.png").stat().st_size > 10_000
