"""The task behind `export.py`: a checkpoint's network as ONNX, checked against PyTorch.

The ONNX graph takes `[N, C, H, W]` float images normalised as the network's data (MNIST's:
`[N, 1, 28, 28]`, mean 0.1307, std 0.3081; any N) and returns `[N, classes]` logits. Before
the file is put in place, onnxruntime runs it on real test images and its logits must match
PyTorch's to 1e-4.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mnistlab import MnistlabError, instantiate
from mnistlab.data import Split, standardize, to_unit
from mnistlab.files import replacing
from mnistlab.module import load_classifier

log = logging.getLogger(__name__)


def export_onnx(net: nn.Module, path: str | Path, check_images: torch.Tensor) -> float:
    """Write `net` as ONNX with a dynamic batch axis; the file is put in place (renamed from a
    temporary one) only once onnxruntime reproduces PyTorch's logits on `check_images`.
    Returns the largest logit difference."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    net = net.eval().cpu()
    example = torch.zeros(2, *check_images.shape[1:])
    with replacing(path) as tmp:
        torch.onnx.export(
            net, (example,), tmp, input_names=["image"], output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, external_data=False, verbose=False,
        )  # fmt: skip
        return check_against_torch(net, tmp, check_images)


def onnx_logits(path: str | Path, images: torch.Tensor) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"image": images.numpy().astype(np.float32)})[0]


def check_against_torch(net: nn.Module, path: str | Path, images: torch.Tensor, atol: float = 1e-4) -> float:
    """Largest |ONNX - PyTorch| logit difference on `images`; raises if above `atol`."""
    with torch.no_grad():
        expected = net.eval()(images).numpy()
    got = onnx_logits(path, images)
    worst = float(np.abs(got - expected).max())
    if worst > atol or (got.argmax(1) != expected.argmax(1)).any():
        raise MnistlabError(
            f"{path}: ONNX logits differ from PyTorch by {worst:.2e} (> {atol}); not exported"
        )
    return worst


def official_test_set(data_cfg) -> Split:
    """The official test images (uint8) and labels, fetched and verified as training does."""
    datamodule = instantiate(data_cfg)
    datamodule.prepare_data()
    datamodule.setup("test")
    return datamodule.test_set


def first_test_images(data_cfg, count: int) -> torch.Tensor:
    """The first `count` official test images, normalised as the network takes them."""
    return standardize(to_unit(official_test_set(data_cfg).images[:count]), data_cfg.mean, data_cfg.std)


def output_path(ckpt_path: str | Path, output: str | None, overwrite: bool) -> Path:
    """Where the ONNX file goes (next to the checkpoint unless `output` says), checked to be
    writable and new before any export work starts."""
    path = Path(output) if output else Path(ckpt_path).with_suffix(".onnx")
    if path.is_dir():
        raise MnistlabError(f"output={path} is a directory; pass output=<a file name ending in .onnx>")
    if path.exists() and not overwrite:
        raise MnistlabError(f"{path} already exists; pass overwrite=true to replace it, or another output=")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as e:
        raise MnistlabError(
            f"cannot write to {path.parent} ({e.strerror}); pass output=<a writable path>"
        ) from None
    return path


def export(cfg) -> float:
    """Export the checkpoint, checked on the first `check_images` official test images."""
    model = load_classifier(cfg.ckpt_path)
    path = output_path(cfg.ckpt_path, cfg.output, cfg.overwrite)
    images = first_test_images(cfg.data, cfg.check_images)
    if list(images.shape[1:]) != list(model.hparams.data["input_shape"]):
        raise MnistlabError(
            f"{cfg.ckpt_path} takes {model.hparams.data['input_shape']} images, the data config gives "
            f"{list(images.shape[1:])}; pass the data= the checkpoint was trained on"
        )
    net = model.net
    worst = export_onnx(net, path, check_images=images)
    print(f"{path}: ONNX logits match PyTorch within {worst:.1e} on {len(images)} test images")
    return worst
