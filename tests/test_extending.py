"""docs/extending.md as a test: the files it shows are the repository's, and every command it
gives runs on the tiny data (in-process, with the entry points' own task functions)."""

from __future__ import annotations

import json
import re
import shlex
import sqlite3
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import ROOT, compose_tiny, idx_bytes
from mnistlab.evaluate import evaluate
from mnistlab.export import export
from mnistlab.predict import predict
from mnistlab.summary import print_summary
from mnistlab.train import train

GUIDE = (ROOT / "docs" / "extending.md").read_text()
FILES = re.findall(r"<!-- file: (\S+) -->\n```\w+\n(.*?)```", GUIDE, re.S)
COMMANDS = [
    line
    for block in re.findall(r"<!-- run -->\n```bash\n(.*?)```", GUIDE, re.S)
    for line in block.strip().splitlines()
]


@pytest.mark.parametrize(("path", "text"), FILES, ids=[path for path, _ in FILES])
def test_each_file_the_guide_shows_is_the_file_in_the_repository(path, text):
    assert (ROOT / path).read_text() == text


def test_the_guide_shows_every_extension():
    shown = {path for path, _ in FILES}
    assert {"extensions/small_resnet.py", "conf/scheduler/warmup_cosine.yaml", "conf/data/my_dataset.yaml",
            "conf/metrics/f1_macro.yaml", "extensions/callbacks.py"} <= shown  # fmt: skip
    assert any("logger=mlflow" in c for c in COMMANDS) and any("logger=wandb" in c for c in COMMANDS)


@pytest.fixture(scope="module")
def my_dataset(tmp_path_factory) -> Path:
    """Files for `data=my_dataset` as the template names them: 3 classes of 16x16 bars."""
    folder = tmp_path_factory.mktemp("my_dataset")
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 600), ("test", 100)):
        labels = torch.randint(0, 3, (n,), generator=g, dtype=torch.uint8)
        images = torch.randint(0, 40, (n, 16, 16), generator=g, dtype=torch.uint8)
        for i, label in enumerate(labels.tolist()):
            images[i, 3 + 4 * label : 5 + 4 * label, 2:14] = 255
        (folder / f"{split}-images.idx").write_bytes(idx_bytes(images))
        (folder / f"{split}-labels.idx").write_bytes(idx_bytes(labels))
    return folder


def run_command(command: str, tiny_mnist, tmp_path: Path, my_dataset: Path, run_dir: Path):
    """One `python X.py overrides` line of the guide, on the tiny data and in tmp_path."""
    script, *overrides = shlex.split(command)[1:]
    overrides = [o.replace("logs/runs/RUN", str(run_dir)) for o in overrides]
    name = script.removesuffix(".py")
    if name == "train":
        extra = ["debug=limit"]
        if "logger=mlflow" in overrides:
            extra += [f"logger.mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
                      f"logger.mlflow.artifact_location={tmp_path}/artifacts"]  # fmt: skip
        if "data=my_dataset" in overrides:
            extra += [f"data.data_dir={my_dataset}", "data.train_size=500", "data.val_size=100",
                      "data.num_classes=3", "model.layers=[conv 1 8,maxpool,gap,linear 8 3]"]  # fmt: skip
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg = compose_tiny(tiny_mnist, run_dir, *overrides, *extra)
        if "data=my_dataset" in overrides:  # the template's sizes, not the tiny MNIST's
            cfg.data.checksums = None
        return train(cfg, run_dir)
    if name == "predict":
        image = tmp_path / "digit.png"
        digit = torch.zeros(28, 28, dtype=torch.uint8)
        digit[6:22, 12:16] = 255  # a drawn "1"
        Image.fromarray(digit.numpy()).save(image)
        overrides = [o.replace("image=digit.png", f"image={image}") for o in overrides]
    if name == "export":
        overrides = [o.replace("output=", f"output={tmp_path}/") for o in overrides]
    cfg = compose_tiny(tiny_mnist, tmp_path, *overrides, config_name=name)
    if name == "summary":
        return print_summary(cfg.model, cfg.data)
    return {"eval": evaluate, "export": export, "predict": predict}[name](cfg)


def test_the_network_example_runs_through_every_entry_point(tiny_mnist, tmp_path, my_dataset, capsys):
    commands = [c for c in COMMANDS if "small_resnet" in c or "RUN" in c]
    assert [c.split()[1] for c in commands] == [
        "summary.py",
        "train.py",
        "eval.py",
        "export.py",
        "predict.py",
    ]
    run_dir = tmp_path / "run"
    results = [run_command(c, tiny_mnist, tmp_path, my_dataset, run_dir) for c in commands]
    table = capsys.readouterr().out
    assert "blocks.0.conv2" in table and "Total params: 9,690" in table and " ?" in table
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["params"] == 9_690
    assert 0 <= results[2]["test/acc"] <= 1 and results[2]["test/loss"] > 0  # eval of last.ckpt
    assert results[3] < 1e-4  # ONNX logits match PyTorch's
    assert (tmp_path / "small_resnet.onnx").is_file()
    assert set(results[4]) == {"digit", "probabilities"} and len(results[4]["probabilities"]) == 10


def test_warmup_and_cosine_schedule_reaches_its_planned_length(tiny_mnist, tmp_path, my_dataset):
    (command,) = [c for c in COMMANDS if "warmup_cosine" in c]
    metrics = run_command(command, tiny_mnist, tmp_path, my_dataset, tmp_path / "run")
    assert metrics["status"] == "ok"
    rows = (tmp_path / "run" / "csv" / "metrics.csv").read_text().splitlines()
    column = rows[0].split(",").index("lr")
    lr = [float(r.split(",")[column]) for r in rows[1:] if r.split(",")[column]]
    assert lr[0] == pytest.approx(0.01 * 0.01)  # the warm-up's first step: 1% of optimizer.lr


def test_a_dataset_of_the_users_own_files_trains_and_is_left_unchanged(tiny_mnist, tmp_path, my_dataset):
    before = {p.name: p.read_bytes() for p in my_dataset.iterdir()}
    (command,) = [c for c in COMMANDS if "data=my_dataset" in c]
    metrics = run_command(command, tiny_mnist, tmp_path, my_dataset, tmp_path / "run")
    assert metrics["status"] == "ok" and "stress/acc" not in metrics  # not MNIST digits: no stress sets
    assert {p.name: p.read_bytes() for p in my_dataset.iterdir()} == before
    checkpoint = torch.load(tmp_path / "run" / metrics["checkpoint"], weights_only=True)
    assert checkpoint["hyper_parameters"]["data"]["input_shape"] == [1, 16, 16]

    # predict.py reads any picture for it (grey, resized, normalised as the data); the demo refuses
    from omegaconf import OmegaConf

    from mnistlab import MnistlabError
    from mnistlab.demo import networks

    ckpt = tmp_path / "run" / metrics["checkpoint"]
    Image.fromarray((torch.rand(40, 30) * 255).byte().numpy()).save(tmp_path / "any.png")
    answer = predict(OmegaConf.create({"image": str(tmp_path / "any.png"), "ckpt_path": str(ckpt)}))
    assert set(answer) == {"class", "probabilities"} and len(answer["probabilities"]) == 3
    with pytest.raises(MnistlabError, match="was not trained on MNIST digits"):
        networks(OmegaConf.create({"ckpt_path": str(ckpt), "models": [], "paths": {"weights": "."}}))


def test_macro_f1_and_per_class_accuracy_are_logged_for_val_and_test(tiny_mnist, tmp_path, my_dataset):
    (command,) = [c for c in COMMANDS if "f1_macro" in c]
    metrics = run_command(command, tiny_mnist, tmp_path, my_dataset, tmp_path / "run")
    for stage in ("test", "stress"):
        assert 0 <= metrics[f"{stage}/f1_macro"] <= 1 and f"{stage}/acc_class/9" in metrics
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    tags = events.Tags()["scalars"]
    assert {"val/f1_macro", "val/acc_class/0", "test/f1_macro"} <= set(tags)
    assert len(events.Scalars("test/acc")) == 1, "the stress sets are not logged as test/*"


def test_a_users_callback_logs_its_metric(tiny_mnist, tmp_path, my_dataset):
    (command,) = [c for c in COMMANDS if "grad_norm" in c]
    run_command(command, tiny_mnist, tmp_path, my_dataset, tmp_path / "run")
    header = (tmp_path / "run" / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "train/grad_norm" in header.split(",")


def test_mlflow_gets_the_runs_settings_figures_and_pictures(tiny_mnist, tmp_path, my_dataset):
    (command,) = [c for c in COMMANDS if "logger=mlflow" in c]
    metrics = run_command(command, tiny_mnist, tmp_path, my_dataset, tmp_path / "run")
    store = sqlite3.connect(tmp_path / "mlflow.db")
    params = dict(store.execute("select key, value from params").fetchall())
    logged = {key: value for key, value in store.execute("select key, value from latest_metrics")}
    assert params["optimizer.lr"] == "0.025" and params["seed"] == "1"
    assert logged["test/acc"] == pytest.approx(metrics["test/acc"])
    pictures = {p.name for p in (tmp_path / "artifacts").glob("*/artifacts/**/*.png")}
    assert {"val.png", "test.png", "augmented_train.png"} <= pictures


def test_wandb_offline_writes_the_run_under_its_directory(tiny_mnist, tmp_path, my_dataset):
    (command,) = [c for c in COMMANDS if "logger=wandb" in c]
    metrics = run_command(command, tiny_mnist, tmp_path, my_dataset, tmp_path / "run")
    assert metrics["status"] == "ok"
    (offline,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    assert list(offline.glob("*.wandb"))
