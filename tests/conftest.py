"""Shared fixtures: a tiny MNIST written as real IDX files, and the composed Hydra config."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from mnistlab.cli import register
from mnistlab.data import MNIST_FILES, TEST_IMAGES, TEST_LABELS, md5

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TINY_TRAIN, TINY_TEST = 1200, 200
register()  # what the entry scripts do before Hydra composes


def idx_bytes(array: torch.Tensor) -> bytes:
    """The IDX encoding of a uint8 tensor: magic (0, 0, 0x08, ndim), big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.dim()]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.contiguous().numpy().tobytes()


def tiny_digits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise plus a bright bar whose row is the label: learnable, unlike pure noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g, dtype=torch.uint8)
    images = torch.randint(0, 60, (n, 28, 28), generator=g, dtype=torch.uint8)
    for i, label in enumerate(labels.tolist()):
        images[i, 4 + 2 * label : 6 + 2 * label, 6:22] = 255
    return images, labels


@dataclass
class TinyMnist:
    data_dir: Path
    checksums: dict[str, str]
    config_dir: Path  # holds data/tiny.yaml: `--config-dir DIR data=tiny` in subprocess runs


@pytest.fixture(scope="session")
def tiny_mnist(tmp_path_factory) -> TinyMnist:
    root = tmp_path_factory.mktemp("tiny_mnist")
    data_dir = root / "data"
    data_dir.mkdir()
    train_images, train_labels = tiny_digits(TINY_TRAIN, seed=0)
    test_images, test_labels = tiny_digits(TINY_TEST, seed=1)
    checksums = {}
    arrays = {
        "train_images": train_images,
        "train_labels": train_labels,
        "test_images": test_images,
        "test_labels": test_labels,
    }
    for role, array in arrays.items():
        raw = idx_bytes(array)
        (data_dir / MNIST_FILES[role]).write_bytes(raw)
        checksums[role] = md5(raw)
    config_dir = root / "conf"
    (config_dir / "data").mkdir(parents=True)
    lines = [
        "defaults: [mnist]",
        f"data_dir: {data_dir}",
        "train_size: 1000",
        "val_size: 200",
        "batch_size: 100",
        "sources: []",
        "checksums:",
        *(f"  {k}: {v}" for k, v in checksums.items()),
    ]
    (config_dir / "data" / "tiny.yaml").write_text("\n".join(lines) + "\n")
    return TinyMnist(data_dir, checksums, config_dir)


def compose_tiny(tiny_mnist, output_dir: Path, *overrides: str, config_name: str = "train"):
    """A config of `conf/` (train, eval, search, ...) composed with overrides, pointed at the tiny
    data and `output_dir`, with HydraConfig set as a Hydra app's task sees it."""
    tiny = [
        f"data.data_dir={tiny_mnist.data_dir}",
        "data.train_size=1000",
        "data.val_size=200",
        "data.batch_size=100",
        "data.checksums={" + ",".join(f"{k}:{v}" for k, v in tiny_mnist.checksums.items()) + "}",
        "data.sources=[]",
    ]
    if config_name == "predict":  # reads no data set
        tiny = []
    if config_name in ("train", "search"):
        tiny.append("compile=false")  # compiling costs more than a test's few batches
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(config_name, overrides=[*tiny, *overrides], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


@pytest.fixture
def compose_train(tiny_mnist, tmp_path):
    """`compose_tiny` with the test's tmp_path as the run directory."""
    yield lambda *overrides, config_name="train": compose_tiny(
        tiny_mnist, tmp_path, *overrides, config_name=config_name
    )
    GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def finished_run(tiny_mnist, tmp_path_factory) -> Path:
    """The run directory of a `debug=limit` training on the tiny data, trained in this process
    once: read by the tests of run outputs, eval, export, predict and the stress figures."""
    from mnistlab.train import train

    run_dir = tmp_path_factory.mktemp("run")
    train(compose_tiny(tiny_mnist, run_dir, "debug=limit"))
    GlobalHydra.instance().clear()
    return run_dir


@pytest.fixture(scope="session")
def script_run(tiny_mnist, tmp_path_factory):
    """`train.py` run as a user runs it (a subprocess) on the tiny data with `debug=limit`:
    its run directory and its finished process, for the tests of what the script adds."""
    run_dir = tmp_path_factory.mktemp("script_run")
    result = run_script(
        "train.py", "--config-dir", str(tiny_mnist.config_dir), "data=tiny", "debug=limit",
        f"hydra.run.dir={run_dir}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


FIRST40 = ROOT / "tests" / "first40"  # the first 40 images and labels of the official test set


@pytest.fixture(scope="session")
def real_test_digits():
    """The first 40 official test images and labels, as committed in tests/first40 (the
    integration tier checks them against the real files)."""
    from mnistlab.data import read_idx

    return read_idx(FIRST40 / TEST_IMAGES), read_idx(FIRST40 / TEST_LABELS)


# What makes two processes of 50 take exactly the steps of one process of 100: no BatchNorm
# (on CPU each DDP process normalises by its own half batch; SyncBatchNorm needs GPUs), no
# random draws inside a batch (dropout, augmentation) that the two layouts would split, and a
# net that learns the tiny digits in a few steps without BatchNorm (a stalled deep one makes
# Adam amplify float rounding, its steps being the gradient over its own size).
SAME_STEPS = [
    "model.batch_norm=false", "model.dropout=0", "data.augment=none",
    "model.layers=['conv 1 8','maxpool','flatten','linear 1568 10']",
]  # fmt: skip
DDP_ON_CPU = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]


def assert_same_training(one: Path, other: Path) -> None:
    """The two run directories hold the same final weights (to float rounding) and figures."""
    a, b = (torch.load(run / "checkpoints" / "last.ckpt", weights_only=True) for run in (one, other))
    assert a["global_step"] == b["global_step"] > 0
    for key, tensor in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], tensor, rtol=1e-4, atol=1e-5, msg=key)
    ma, mb = (json.loads((run / "metrics.json").read_text()) for run in (one, other))
    assert ma["status"] == mb["status"] == "ok" and ma["epochs"] == mb["epochs"]
    for key in ["val/acc_best", "test/acc"]:
        assert ma[key] == mb[key], key
    assert abs(ma["test/loss"] - mb["test/loss"]) < 1e-4


def run_script(*args: str, cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run one of the root scripts as a user would, with this interpreter."""
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
