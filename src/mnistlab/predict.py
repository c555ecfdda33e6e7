"""The task behind `predict.py`: the class of an image and the class probabilities, from released
weights or a checkpoint. A digit network reads a photo or scan prepared as MNIST would have made
it (`prepare.py`); a network trained on other data gets the image in grey, resized to its input
and normalised as its data was."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from mnistlab import MnistlabError, instantiate
from mnistlab.data import standardize
from mnistlab.module import load_classifier
from mnistlab.prepare import flatten_alpha, load_image, mnist_style


def as_input(image: Image.Image, data: dict) -> torch.Tensor:
    """[1, C, H, W] for a network whose checkpoint describes its data (`Classifier.hparams.data`)."""
    if data.get("digits", True):
        return mnist_style(image)
    _, height, width = data["input_shape"]
    grey = flatten_alpha(image).resize((width, height), Image.BILINEAR)
    pixels = torch.frombuffer(bytearray(grey.tobytes()), dtype=torch.uint8).float().view(1, 1, height, width)
    return standardize(pixels / 255, data["mean"], data["std"])


def load_network(ckpt_path: str | None, weights: str | Path, model_cfg) -> torch.nn.Module:
    """A checkpoint's network, or else a released state_dict in the architecture of `model_cfg`."""
    if ckpt_path:
        return load_classifier(ckpt_path).net.eval()
    weights = Path(weights)
    from mnistlab.release import complete_interrupted

    complete_interrupted(weights.parent, weights.stem)  # a release killed mid-rename: finish it first
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
    """Read the image first (the input most likely to be wrong), then the model."""
    image = load_image(cfg.image)
    if cfg.get("ckpt_path"):
        model = load_classifier(cfg.ckpt_path)
        net, data = model.net.eval(), model.hparams.data
    else:  # released weights: the project's digit networks
        net, data = load_network(None, cfg.weights, cfg.model), {"digits": True}
    prepared = as_input(image, data)
    with torch.no_grad():
        probabilities = torch.softmax(net(prepared), dim=1)[0]
    result = {
        ("digit" if data.get("digits", True) else "class"): int(probabilities.argmax()),
        "probabilities": [round(float(p), 4) for p in probabilities],
    }
    print(json.dumps({"image": str(cfg.image), **result}))
    return result
