"""The training task end to end on tiny data: the real Trainer, loggers, checkpoints, metrics."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from lightning import Trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT, run_script
from mnistlab import MnistlabError
from mnistlab.data import MNISTDataModule
from mnistlab.module import Classifier, load_classifier
from mnistlab.train import check_config, resume_from, train

TINY_LIMITS = [
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
]


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["optimizer=sgd", "scheduler=one_cycle"],
        ["scheduler=none", "data.augment=notebook"],
        ["trainer=gpu", "trainer.accelerator=cpu"],  # the GPU recipe's bf16 autocast, on the CPU
    ],
    ids=["default", "sgd-one_cycle", "constant-notebook", "gpu-recipe-on-cpu"],
)
def test_fast_dev_run_of_the_composed_config(compose_train, overrides):
    cfg = compose_train("trainer.fast_dev_run=true", *overrides)
    metrics = train(cfg)
    assert metrics["status"] == "ok" and 0 <= metrics["test/acc"] <= 1


def test_without_a_validation_set_the_last_checkpoint_is_tested(compose_train, tmp_path):
    cfg = compose_train("data.val_size=0", *TINY_LIMITS)
    metrics = train(cfg)
    assert metrics["val/acc_best"] is None
    assert metrics["checkpoint"] == "checkpoints/last.ckpt"
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics


@pytest.fixture(scope="module")
def finished_run(tiny_mnist, tmp_path_factory):
    """`train.py` run as a user runs it, on the tiny data, with Lightning's batch limits."""
    run_dir = tmp_path_factory.mktemp("run")
    result = run_script(
        "train.py",
        "--config-dir",
        str(tiny_mnist.config_dir),
        "data=tiny",
        *TINY_LIMITS,
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_train_script_writes_metrics_json_with_the_promised_fields(finished_run):
    metrics = json.loads((finished_run / "metrics.json").read_text())
    for key in [
        "test/acc",
        "test/loss",
        "val/acc_best",
        "epochs",
        "params",
        "seed",
        "train_seconds",
    ]:
        assert metrics[key] is not None, key
    assert metrics["epochs"] == 2 and metrics["params"] == 19_348 and metrics["seed"] == 1
    assert (finished_run / ".hydra" / "config.yaml").is_file()
    # the code it ran: this checkout's commit (+dirty while files differ from it)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    assert metrics["commit"].split("+")[0] == head.strip()


def test_train_log_keeps_the_model_table_and_one_line_per_epoch(finished_run):
    text = (finished_run / "train.log").read_text()
    assert "Total params: 19,348" in text and "   RF" in text
    epoch_lines = [line for line in text.splitlines() if "mnistlab.train" in line and "] - epoch " in line]
    assert len(epoch_lines) == 2 and "epoch 2/2" in epoch_lines[-1] and "val/acc " in epoch_lines[-1]


def test_train_script_logs_every_metric_to_tensorboard(finished_run):
    events = EventAccumulator(str(finished_run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected = {
        "train/loss",
        "train/acc",
        "val/loss",
        "val/acc",
        "val/acc_best",
        "test/loss",
        "test/acc",
        "lr",
    }
    assert expected <= tags
    assert len(events.Scalars("val/acc")) == 2  # one point per epoch


def test_tensorboard_shows_inputs_confusion_matrices_and_mistakes(finished_run):
    events = EventAccumulator(str(finished_run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    images = set(events.Tags()["images"])
    assert {"data/augmented_train", "confusion/val", "confusion/test", "test/misclassified"} <= images
    picture = events.Images("test/misclassified")[-1]
    assert picture.width > 200 and picture.encoded_image_string.startswith(b"\x89PNG")


def hparams_of(run_dir) -> dict:
    """The hparams entry of a run's TensorBoard events, as TensorBoard's HParams tab reads it."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    return {k: v.ListFields()[0][1] for k, v in start.session_start_info.hparams.items()}


def test_tensorboard_hparams_hold_the_settings_and_the_final_metrics(finished_run):
    events = EventAccumulator(str(finished_run / "tensorboard"))
    events.Reload()
    metrics = json.loads((finished_run / "metrics.json").read_text())
    hparams = hparams_of(finished_run)
    assert hparams["model.dropout"] == 0.1 and hparams["optimizer"] == "torch.optim.Adam"
    assert hparams["data.batch_size"] == 100 and hparams["seed"] == 1
    assert events.Scalars("hp/test_acc")[-1].value == pytest.approx(metrics["test/acc"])
    assert events.Scalars("hp/val_acc_best")[-1].value == pytest.approx(metrics["val/acc_best"])


def test_checkpoints_load_with_weights_only_and_eval_reproduces_the_test_metrics(finished_run, tiny_mnist):
    metrics = json.loads((finished_run / "metrics.json").read_text())
    best = finished_run / metrics["checkpoint"]
    assert best.name.startswith("best-") and (finished_run / "checkpoints" / "last.ckpt").is_file()
    checkpoint = torch.load(best, weights_only=True)
    assert checkpoint["hyper_parameters"]["model"]["_target_"] == "mnistlab.models.build_net"

    result = run_script(
        "eval.py",
        "--config-dir",
        str(tiny_mnist.config_dir),
        "data=tiny",
        f"ckpt_path={best}",
        "trainer.limit_test_batches=2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads(result.stdout.strip().splitlines()[-1])
    assert evaluated["test/acc"] == pytest.approx(metrics["test/acc"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval.py", "ckpt_path=missing.ckpt"], "error: checkpoint missing.ckpt does not exist"),
        (["eval.py"], "error: ckpt_path is required"),
    ],
)
def test_bad_input_is_one_line_and_a_non_zero_exit(args, message):
    result = run_script(*args)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(message)


def test_a_diverging_run_stops_and_says_so_in_metrics_json(compose_train, tmp_path):
    cfg = compose_train("optimizer=sgd", "optimizer.lr=1e30", "scheduler=none", *TINY_LIMITS)
    with pytest.raises(MnistlabError, match="training diverged in epoch 0 .* lower optimizer.lr"):
        train(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "diverged" in metrics["error"]


def test_a_grid_multirun_gives_one_directory_per_job_and_one_report_row_each(tiny_mnist, tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_script(
        "train.py", "-m", "--config-dir", str(tiny_mnist.config_dir), "data=tiny",
        "model.dropout=0.05,0.1", "optimizer.lr=0.01,0.05", "trainer.max_epochs=1",
        "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1",
        f"hydra.sweep.dir={sweep_dir}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p.parent for p in sweep_dir.glob("*/metrics.json"))
    assert len(jobs) == 4
    assert all(json.loads((job / "metrics.json").read_text())["status"] == "ok" for job in jobs)
    # TensorBoard's HParams data: four comparable rows, each with its own settings and results
    rows = {(hp["model.dropout"], hp["optimizer.lr"]) for hp in map(hparams_of, jobs)}
    assert rows == {(0.05, 0.01), (0.05, 0.05), (0.1, 0.01), (0.1, 0.05)}

    report = run_script("-m", "mnistlab.report", str(sweep_dir))
    assert report.returncode == 0, report.stderr
    rows = [line for line in (sweep_dir / "report.md").read_text().splitlines() if line.startswith("| `")]
    assert len(rows) == 4
    assert any("model.dropout=0.1 optimizer.lr=0.05" in row for row in rows)
    assert (sweep_dir / "report.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.dropout=1.5", "model.dropout=1.5 is not allowed; use a value in [0, 1)"),
        ("optimizer.lr=-0.1", "optimizer.lr=-0.1 is not allowed; use a value > 0"),
        ("data.batch_size=0", "data.batch_size=0 is not allowed; use an integer >= 1"),
        ("trainer.max_epochs=0", "trainer.max_epochs=0 is not allowed; use an integer >= 1"),
        ("data.val_size=20000", "data.train_size + data.val_size = 70000 is more than MNIST's 60000"),
        (
            "data.augment=sideways",
            "data.augment='sideways' is not allowed; use one of readme, notebook, none",
        ),
    ],
)
def test_out_of_range_values_are_refused(compose_train, override, message):
    with pytest.raises(MnistlabError) as error:
        check_config(compose_train(override, "data.train_size=50000"))
    assert str(error.value).startswith(message)


def test_a_bad_layer_line_stops_train_py_with_one_line(tmp_path):
    result = run_script("train.py", "model.layers=[conv 1 8, attention]", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.startswith(
        "error: model layer 'attention': unknown layer; write one of: conv IN OUT"
    )
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_bad_value_stops_train_py_with_one_line_before_any_work(tmp_path):
    result = run_script("train.py", "model.dropout=1.5", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2
    assert result.stderr == "error: model.dropout=1.5 is not allowed; use a value in [0, 1)\n"
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.json").exists()


def test_a_failing_job_does_not_stop_its_sweep(tiny_mnist, tmp_path):
    result = run_script(
        "train.py", "-m", "--config-dir", str(tiny_mnist.config_dir), "data=tiny", "optimizer=sgd",
        "optimizer.lr=1e30,0.01", "scheduler=none", *TINY_LIMITS[:3], f"hydra.sweep.dir={tmp_path}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    statuses = [json.loads((tmp_path / job / "metrics.json").read_text())["status"] for job in ("0", "1")]
    assert statuses == ["failed", "ok"]


def test_weight_ema_is_what_validation_checkpoints_and_the_test_see(compose_train, tmp_path, tiny_mnist):
    """With `callbacks.ema`, the best checkpoint holds the averaged weights, and train.py's test
    scores those (Lightning's own callback would load the raw weights back for the test)."""
    cfg = compose_train(
        *TINY_LIMITS, "+callbacks.ema._target_=mnistlab.train.EMA", "+callbacks.ema.decay=0.5"
    )
    metrics = train(cfg)
    checkpoint = torch.load(tmp_path / metrics["checkpoint"], weights_only=True)
    averaged, raw = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert any(not torch.equal(averaged[k], raw[k]) for k in raw if k.endswith("weight"))

    datamodule = MNISTDataModule(
        data_dir=tiny_mnist.data_dir,
        train_size=1000,
        val_size=200,
        batch_size=100,
        checksums=tiny_mnist.checksums,
    )
    trainer = Trainer(logger=False, enable_progress_bar=False, limit_test_batches=2)
    (again,) = trainer.test(load_classifier(tmp_path / metrics["checkpoint"]), datamodule=datamodule)
    assert again["test/loss"] == pytest.approx(metrics["test/loss"])


def test_label_smoothing_shapes_the_training_loss_only(compose_train):
    batch = (torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)))
    losses = {}
    for smoothing in (0.0, 0.3):
        cfg = compose_train(f"label_smoothing={smoothing}")
        torch.manual_seed(0)
        module = Classifier(cfg.model, cfg.optimizer, label_smoothing=cfg.label_smoothing)
        module.log = lambda *a, **k: None
        module.eval()
        losses[smoothing] = (
            module._step(batch, "train", module.train_acc)[0].item(),
            module._step(batch, "val", module.val_acc)[0].item(),
        )
    assert losses[0.0][0] != pytest.approx(losses[0.3][0])
    assert losses[0.0][1] == pytest.approx(losses[0.3][1])


def test_a_compiled_network_trains_and_saves_plain_weights(compose_train, tmp_path):
    """`model.compile=true` compiles the network in place: checkpoints keep the plain layer names,
    so they load into an uncompiled network (predict.py, export.py, released weights)."""
    metrics = train(compose_train("model.compile=true", *TINY_LIMITS))
    assert metrics["status"] == "ok"
    state = torch.load(tmp_path / metrics["checkpoint"], weights_only=True)["state_dict"]
    assert "net.0.weight" in state and not any("_orig_mod" in k for k in state)
    plain_module = load_classifier(tmp_path / metrics["checkpoint"])
    assert plain_module.net[0].weight.shape == (14, 1, 3, 3)


def test_resuming_with_another_label_smoothing_is_refused(compose_train, tmp_path):
    cfg = compose_train(*TINY_LIMITS)
    train(cfg)
    same = compose_train(*TINY_LIMITS, "ckpt_path=last")
    assert resume_from(same, tmp_path) == str(tmp_path / "checkpoints" / "last.ckpt")
    other = compose_train(*TINY_LIMITS, "ckpt_path=last", "label_smoothing=0.1")
    with pytest.raises(MnistlabError, match="different label_smoothing"):
        resume_from(other, tmp_path)
