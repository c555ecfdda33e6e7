"""The task behind `predict.py`: the digit in a photo or scan (prepared by `prepare.py`) and the
class probabilities, from released weights or a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mnistlab import MnistlabError, instantiate
from mnistlab.module import load_classifier
from mnistlab.prepare import load_image, mnist_style


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
    """Read and prepare the image first (the input most likely to be wrong), then the model."""
    image = mnist_style(load_image(cfg.image))
    net = load_network(cfg.get("ckpt_path"), cfg.weights, cfg.model)
    with torch.no_grad():
        probabilities = torch.softmax(net(image), dim=1)[0]
    result = {
        "digit": int(probabilities.argmax()),
        "probabilities": [round(float(p), 4) for p in probabilities],
    }
    print(json.dumps({"image": str(cfg.image), **result}))
    return result
