"""The page behind `demo.py`: draw a digit or upload a photo, see the answer, the 10 probabilities
and the 28x28 image the model actually saw (prepared by `prepare.py`, as `predict.py` does).

One named API endpoint, `/predict` (an image file, optionally a model name), serves the page's
upload box and other programs: `gradio_client.Client(URL).predict(handle_file(PATH),
api_name="/predict")`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

from mnistlab import PROJECT_ROOT, MnistlabError
from mnistlab.data import MEAN, STD
from mnistlab.module import load_classifier
from mnistlab.predict import load_network
from mnistlab.prepare import NoDigit, load_image, mnist_style

EXAMPLES = sorted((PROJECT_ROOT / "docs" / "demo").glob("mnist-test-*.png"))  # real MNIST test digits
DRAW = "Pick the brush, draw a digit (or upload one), then press Read."
BLANK = "No digit found: pick the brush, draw a digit (or upload one), then press Read."


def networks(cfg) -> dict[str, torch.nn.Module]:
    """The models the page offers: a checkpoint given as ckpt_path first, then every released one."""
    found = {}
    if cfg.ckpt_path:
        data = load_classifier(cfg.ckpt_path).hparams.data
        if not data.get("digits", True) or data.get("input_shape", [1, 28, 28]) != [1, 28, 28]:
            raise MnistlabError(
                f"{cfg.ckpt_path} was not trained on MNIST digits (data.digits=false); the demo page "
                "reads drawn digits only: use predict.py image=PATH ckpt_path=... for this network"
            )
        found[f"checkpoint {Path(cfg.ckpt_path).name}"] = load_network(cfg.ckpt_path, "", None)
    for name in cfg.models:
        weights = Path(cfg.paths.weights) / f"{name}.pt"
        if weights.is_file():
            model_cfg = OmegaConf.load(PROJECT_ROOT / "conf" / "model" / f"{name}.yaml")
            found[name] = load_network(None, weights, model_cfg)
    if not found:
        raise MnistlabError(
            f"no model to serve: no released weights in {cfg.paths.weights} and no ckpt_path; "
            "run make release or pass ckpt_path=PATH"
        )
    return found


def seen(prepared: torch.Tensor) -> Image.Image:
    """The prepared [1, 1, 28, 28] input as the picture it is, enlarged 8x without smoothing."""
    pixels = (prepared[0, 0] * STD + MEAN).clamp(0, 1).numpy()
    return Image.fromarray(np.uint8(pixels * 255)).resize((224, 224), Image.NEAREST)


def reader(models: dict[str, torch.nn.Module]):
    """The function behind the page: (image, model name) -> (probabilities, seen image, message)."""

    def read(image: Image.Image | str | None, model: str) -> tuple[dict | None, Image.Image | None, str]:
        if image is None:
            return None, None, BLANK
        try:
            prepared = mnist_style(load_image(image) if isinstance(image, str) else image)
        except NoDigit:
            return None, None, BLANK
        except MnistlabError as e:
            return None, None, str(e).replace(str(image), "the upload")
        net = models.get(model) or next(iter(models.values()))
        with torch.no_grad():
            probabilities = torch.softmax(net(prepared), dim=1)[0]
        digit = int(probabilities.argmax())
        answer = {str(d): float(p) for d, p in enumerate(probabilities)}
        return answer, seen(prepared), f"The model reads **{digit}** ({probabilities[digit]:.1%})."

    return read


def drawing(value: dict | None) -> Image.Image | None:
    """The sketchpad's picture: its composite, strokes over the white canvas."""
    return None if value is None or value.get("composite") is None else value["composite"]


def build_app(models: dict[str, torch.nn.Module]):
    import gradio as gr

    read = reader(models)
    with gr.Blocks(title="mnistlab: draw a digit", analytics_enabled=False) as app:
        gr.Markdown("## Draw a digit\nA drawing, a photo or a scan: each is prepared as MNIST's digits were.")
        with gr.Row():
            with gr.Column():
                sketch = gr.Sketchpad(
                    label="draw here",
                    type="pil",
                    image_mode="RGBA",
                    canvas_size=(280, 280),
                    brush=gr.Brush(default_size=18, colors=["#000000"], color_mode="fixed"),
                    layers=False,
                    elem_id="sketchpad",
                )
                # a file, not gr.Image: a non-image upload reaches load_image and its one-line message
                upload = gr.File(label="or upload a photo or scan", file_types=["image"], type="filepath")
                model = gr.Dropdown(list(models), value=next(iter(models)), label="model")
                with gr.Row():
                    submit = gr.Button("Read", variant="primary", elem_id="read")
                    clear = gr.ClearButton(value="Clear")
            with gr.Column():
                message = gr.Markdown(DRAW, elem_id="message")
                answer = gr.Label(num_top_classes=10, label="answer and probabilities", elem_id="answer")
                saw = gr.Image(  # PNG: the default WebP would blur the 28 pixels it shows
                    label="what the model saw (28x28)", interactive=False, height=224, format="png"
                )
        clear.add([sketch, upload, answer, saw])
        clear.click(lambda: DRAW, outputs=message, api_visibility="private")
        outputs = [answer, saw, message]
        upload.upload(read, [upload, model], outputs, api_name="predict")
        submit.click(
            lambda value, name: read(drawing(value), name), [sketch, model], outputs, api_name="draw"
        )
        gr.Examples([[str(path)] for path in EXAMPLES], inputs=[upload], label="real MNIST test digits")
    return app


def serve(cfg) -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from an offline machine
    app = build_app(networks(cfg))
    print(f"mnistlab demo on http://{cfg.host}:{cfg.port} (Ctrl-C stops it)", flush=True)
    app.queue().launch(server_name=cfg.host, server_port=int(cfg.port), show_error=True, quiet=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(*overrides: str, timeout: float = 180):
    """The page as `python demo.py port=<a free port> [overrides]` serves it, in a subprocess:
    yields its URL once it answers, and stops it after."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "demo.py", f"port={port}", *overrides], cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + timeout
    try:
        while True:
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    server.kill()
                    raise RuntimeError(
                        f"demo.py did not serve {url}:\n{server.stdout.read()[-3000:]}"
                    ) from None
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
