"""The training task end to end on tiny data: the real Trainer, loggers, checkpoints, metrics."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from lightning import Trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT, run_script
from mnistlab import MnistlabError
from mnistlab.cli import one_line_errors
from mnistlab.data import IDXDataModule
from mnistlab.evaluate import evaluate
from mnistlab.files import AtomicCheckpointIO
from mnistlab.module import Classifier, load_classifier
from mnistlab.precision import choose_precision, cpu_flags
from mnistlab.report import report
from mnistlab.runs import RunDir, resume_checkpoint
from mnistlab.train import build_trainer, train


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["optimizer=sgd", "scheduler=one_cycle"],
        ["scheduler=none", "data.augment=rotate_zoom"],
        ["trainer=gpu", "trainer.accelerator=cpu"],  # the GPU recipe's bf16 autocast, on the CPU
        ["experiment=speedrun", "trainer.accelerator=cpu"],  # the GPU speedrun's path, on the CPU
    ],
    ids=["default", "sgd-one_cycle", "constant-rotate_zoom", "gpu-recipe-on-cpu", "speedrun-on-cpu"],
)
def test_fast_dev_run_of_the_composed_config(compose_train, tmp_path, overrides):
    metrics = train(compose_train("debug=fdr", *overrides), tmp_path)
    assert metrics["status"] == "ok" and metrics["epochs"] == 1
    # fast_dev_run tests one batch of 100 images: the accuracy is a count out of 100
    assert metrics["test/acc"] * 100 == pytest.approx(round(metrics["test/acc"] * 100), abs=1e-4)


def test_without_a_validation_set_the_last_checkpoint_is_tested(compose_train, tmp_path):
    metrics = train(compose_train("data.val_size=0", "debug=limit"), tmp_path)
    assert metrics["val/acc_best"] is None
    assert metrics["checkpoint"] == "checkpoints/last.ckpt"
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics


def test_a_run_writes_metrics_json_with_the_promised_fields(finished_run):
    metrics = json.loads((finished_run / "metrics.json").read_text())
    for key in ["test/acc", "test/loss", "val/acc_best", "epochs", "params", "seed", "train_seconds"]:
        assert metrics[key] is not None, key
    assert metrics["status"] == "ok" and metrics["started"] <= metrics["ended"]
    assert metrics["epochs"] == 2 and metrics["params"] == 19_348 and metrics["seed"] == 1
    # the code it ran: this checkout's commit (+dirty while files differ from it)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    assert metrics["commit"].split("+")[0] == head.strip()
    # and the machine it ran on (here a CPU: its model, its cores, the PyTorch)
    assert metrics["machine"].endswith(f", {os.cpu_count()} CPUs; torch {torch.__version__}")


@pytest.mark.integration
def test_the_train_script_keeps_its_config_the_model_table_and_one_log_line_per_epoch(script_run):
    run_dir, _ = script_run
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "ok"
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    text = (run_dir / "train.log").read_text()
    assert "Total params: 19,348" in text and "   RF" in text
    epoch_lines = [line for line in text.splitlines() if "mnistlab.train" in line and "] - epoch " in line]
    assert len(epoch_lines) == 2 and "epoch 2/2" in epoch_lines[-1] and "val/acc " in epoch_lines[-1]


NOISE = [
    "litlogger", "LeafSpec", "No CUDA runtime is found", "`srun` command",
    "to estimate number of stepping batches", "Test metric", "┏",
]  # fmt: skip


@pytest.mark.integration
def test_the_console_shows_the_chosen_config_not_the_noise(script_run):
    _, result = script_run
    console = result.stdout + result.stderr
    assert [noise for noise in NOISE if noise in console] == []
    assert "\r" not in console  # no progress bar drawn into a pipe
    config = console.split("run directory:", 1)[1].split("Layer  Type", 1)[0]
    assert "limit_train_batches: 3" in config and "max_epochs: 2" in config
    assert "barebones" not in config and "gradient_clip_val" not in config  # Lightning's defaults
    assert "- ema" in config  # callbacks by name


def test_a_run_logs_every_metric_to_tensorboard(finished_run):
    run_dir = finished_run
    events = EventAccumulator(str(run_dir / "tensorboard"))
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
    run_dir = finished_run
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    images = set(events.Tags()["images"])
    assert {"data/augmented_train", "confusion/val", "confusion/test", "test/misclassified"} <= images
    (picture,) = events.Images("test/misclassified")  # the official test set's, not the stress sets'
    assert picture.width > 200 and picture.encoded_image_string.startswith(b"\x89PNG")
    assert len(events.Images("confusion/test")) == 1


def hparams_of(run_dir) -> dict:
    """The hparams entry of a run's TensorBoard events, as TensorBoard's HParams tab reads it."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    return {k: v.ListFields()[0][1] for k, v in start.session_start_info.hparams.items()}


def test_tensorboard_hparams_hold_the_settings_and_the_final_metrics(finished_run):
    run_dir = finished_run
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    hparams = hparams_of(run_dir)
    assert hparams["model.dropout"] == 0.1 and hparams["optimizer"] == "torch.optim.Adam"
    assert hparams["data.batch_size"] == 100 and hparams["seed"] == 1
    assert events.Scalars("hp/test_acc")[-1].value == pytest.approx(metrics["test/acc"])
    assert events.Scalars("hp/val_acc_best")[-1].value == pytest.approx(metrics["val/acc_best"])


def test_checkpoints_load_with_weights_only_and_eval_reproduces_the_test_metrics(
    finished_run, compose_train, capsys
):
    run_dir = finished_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    best = run_dir / metrics["checkpoint"]
    assert best.name.startswith("best-") and (run_dir / "checkpoints" / "last.ckpt").is_file()
    checkpoint = torch.load(best, weights_only=True)
    assert checkpoint["hyper_parameters"]["model"]["_target_"] == "mnistlab.models.build_net"

    cfg = compose_train(f"ckpt_path={best}", "trainer.limit_test_batches=2", config_name="eval")
    evaluated = one_line_errors(evaluate)(cfg)
    assert evaluated["test/acc"] == pytest.approx(metrics["test/acc"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["test/acc"] == evaluated["test/acc"] and printed["ckpt_path"] == str(best)


def test_the_train_task_returns_val_acc_best_for_sweeper_plugins(compose_train, tmp_path):
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    returned = script.main(compose_train("debug=limit"))  # Hydra passes a given config straight through
    assert returned == json.loads((tmp_path / "metrics.json").read_text())["val/acc_best"]
    assert 0 < returned <= 1


@pytest.mark.parametrize(
    ("ckpt_path", "message"),
    [
        ("missing.ckpt", "checkpoint missing.ckpt does not exist; pass ckpt_path="),
        (
            str(ROOT / "pyproject.toml"),
            "pyproject.toml is not a mnistlab checkpoint that loads with weights_only",
        ),
    ],
)
def test_eval_of_a_bad_checkpoint_is_one_line_and_exit_2(compose_train, capsys, ckpt_path, message):
    cfg = compose_train(f"ckpt_path={ckpt_path}", config_name="eval")
    with pytest.raises(SystemExit) as exit_:
        one_line_errors(evaluate)(cfg)
    stderr = capsys.readouterr().err
    assert exit_.value.code == 2 and stderr.count("\n") == 1 and message in stderr


def test_eval_without_a_checkpoint_says_which_key_is_missing(compose_train, capsys):
    with pytest.raises(SystemExit) as exit_:
        one_line_errors(evaluate)(compose_train(config_name="eval"))
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "error: ckpt_path is required: add ckpt_path=VALUE to the command\n"


@pytest.mark.parametrize(
    "optimizer",
    [
        ["optimizer=sgd", "optimizer.lr=1e30"],
        ["optimizer=adam", "optimizer.lr=1e9"],
        ["optimizer=adam", "optimizer.lr=1e9", "trainer.max_epochs=1"],
    ],
    ids=["sgd", "adam", "adam-one-epoch"],
)
def test_a_diverging_run_fails_and_says_so_in_metrics_json(compose_train, tmp_path, optimizer):
    """Non-finite (SGD) or finite but far above chance (Adam): both are divergence, in the first
    epoch too (a one-epoch run ends there)."""
    cfg = compose_train(*optimizer, "scheduler=none", "callbacks=default", "debug=limit")
    with pytest.raises(MnistlabError, match=r"training diverged in epoch [01] .* lower optimizer.lr"):
        train(cfg, tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "diverged" in metrics["error"] and "test/acc" not in metrics


@pytest.mark.integration
def test_a_sweep_with_a_failed_job_finishes_the_others_exits_1_and_names_it(tiny_mnist, tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_script(
        "train.py", "-m", "--config-dir", str(tiny_mnist.config_dir), "data=tiny", "debug=limit",
        "optimizer=sgd", "scheduler=none", "optimizer.lr=0.01,0.02,1e30", f"hydra.sweep.dir={sweep_dir}",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 job(s) failed: job 2 (") and "optimizer.lr=1e+30" in last
    assert "diverged" in last
    statuses = [json.loads((sweep_dir / j / "metrics.json").read_text())["status"] for j in "012"]
    assert statuses == ["ok", "ok", "failed"]
    # TensorBoard's HParams data: one comparable row per finished job, each with its own settings
    assert {hparams_of(sweep_dir / j)["optimizer.lr"] for j in "01"} == {0.01, 0.02}

    report(sweep_dir)
    text = (sweep_dir / "report.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) == 2 and any("optimizer.lr=0.02" in row for row in rows)
    assert "## Runs that did not finish" in text and "optimizer.lr=1e+30" in text
    assert (sweep_dir / "report.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.dropout=1.5", "model.dropout=1.5 is not allowed; use a value in [0, 1)"),
        ("optimizer.lr=-0.1", "optimizer.lr=-0.1 is not allowed; use a value > 0"),
        ("data.batch_size=0", "data.batch_size=0 is not allowed; use an integer >= 1"),
        ("trainer.max_epochs=0", "trainer.max_epochs=0 is not allowed; use an integer >= 1"),
        ("trainer.limit_train_batches=0", "trainer.limit_train_batches=0 trains nothing"),
        ("data.val_size=20000", "data.train_size + data.val_size = 21000 is more than the 1200"),
        (
            "data.augment=sideways",
            "data.augment='sideways' is not allowed; use one of rotate_shift, rotate_zoom",
        ),
        ("seed=abc", "seed='abc' is not allowed; use an integer in [0, 4294967295]"),
        ("seed=-5", "seed=-5 is not allowed"),
        ("seed=1.5", "seed=1.5 is not allowed"),
        ("label_smoothing=2", "label_smoothing=2 is not allowed; use a value in [0, 1)"),
        (
            "model.layers=[conv 1 14,gap,linear 20 10]",
            "model layer 'linear 20 10' does not fit its input [14]",
        ),
        (
            "model.layers=[conv 1 8,attention]",
            "model layer 'attention': unknown layer; write one of: conv IN OUT",
        ),
        ("trainer.accelerator=gpu", "trainer.accelerator=gpu: "),
    ],
)
def test_bad_values_are_refused_before_any_work(compose_train, tmp_path, override, message):
    if override == "trainer.accelerator=gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(MnistlabError) as error:
        train(compose_train(override, "debug=limit"), tmp_path)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []  # no metrics.json, no checkpoints, no logs


@pytest.mark.integration
def test_a_rejected_run_prints_one_line_and_leaves_no_directory(tmp_path):
    run_dir = tmp_path / "run"
    result = run_script("train.py", "model.dropout=1.5", f"hydra.run.dir={run_dir}")
    assert result.returncode == 2
    assert result.stderr == "error: model.dropout=1.5 is not allowed; use a value in [0, 1)\n"
    assert not run_dir.exists()


def test_a_misspelt_optimizer_argument_is_one_line_before_any_work(compose_train, tmp_path):
    with pytest.raises(MnistlabError) as error:
        train(compose_train("debug=limit", "+optimizer.lrr=0.1"), tmp_path)
    assert str(error.value).startswith("optimizer.lrr is not an argument of torch.optim.Adam (it takes lr,")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.integration
def test_logs_on_a_read_only_disk_is_one_line_not_a_traceback(tmp_path):
    """MNISTLAB_ROOT where nothing can be made (/proc refuses new folders, to root as well)."""
    result = subprocess.run(
        [sys.executable, "train.py", "debug=fdr"], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "MNISTLAB_ROOT": "/proc/mnistlab"},
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: cannot make the run directory /proc/mnistlab/logs/")
    assert line.endswith("set MNISTLAB_ROOT or paths.logs to a writable folder")


def test_checkpoints_are_written_through_the_atomic_writer(compose_train):
    trainer = build_trainer(compose_train("debug=limit"))
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_weight_ema_is_what_validation_checkpoints_and_the_test_see(compose_train, tmp_path, tiny_mnist):
    """With the `ema` callback, the best checkpoint holds the averaged weights, and train.py's
    test scores those (Lightning's own callback would load the raw weights back for the test)."""
    metrics = train(compose_train("debug=limit", "callbacks.ema.decay=0.5"), tmp_path)
    checkpoint = torch.load(tmp_path / metrics["checkpoint"], weights_only=True)
    averaged, raw = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert any(not torch.equal(averaged[k], raw[k]) for k in raw if k.endswith("weight"))

    datamodule = IDXDataModule(
        data_dir=tiny_mnist.data_dir, train_size=1000, val_size=200, batch_size=100,
        checksums=tiny_mnist.checksums,
    )  # fmt: skip
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
            module.training_step(batch, 0).item(),
            module._loss(module(batch[0]), batch[1], "val").item(),
        )
    assert losses[0.0][0] != pytest.approx(losses[0.3][0])
    assert losses[0.0][1] == pytest.approx(losses[0.3][1])


@pytest.mark.slow  # torch.compile alone takes ~20 s here
def test_a_compiled_network_trains_and_saves_plain_weights(compose_train, tmp_path):
    """`compile=true` compiles the network in place: checkpoints keep the plain layer names,
    so they load into an uncompiled network (predict.py, export.py, released weights). With no
    precision given, it trains in what this CPU's real flags choose for a compiled network
    (bf16-mixed with AMX or AVX-512-BF16) and says so."""
    metrics = train(compose_train("debug=limit", "compile=true", "trainer.accelerator=cpu"), tmp_path)
    assert metrics["status"] == "ok"
    recorded = json.loads((tmp_path / "metrics.json").read_text())
    expected, why = choose_precision("cpu", cpu_flags(), cuda_bf16=False, compiled=True)
    assert recorded["precision"] == expected
    assert recorded["precision_why"] == f"trainer.precision=auto on cpu: {why}"
    state = torch.load(tmp_path / metrics["checkpoint"], weights_only=True)["state_dict"]
    assert "net.0.weight" in state and not any("_orig_mod" in k for k in state)
    plain_module = load_classifier(tmp_path / metrics["checkpoint"])
    assert plain_module.net[0].weight.shape == (14, 1, 3, 3)


def test_resuming_checks_the_recipe_and_refuses_a_finished_run(compose_train, tmp_path):
    train(compose_train("debug=limit"), tmp_path)
    before = (tmp_path / "metrics.json").read_text()
    last = tmp_path / "checkpoints" / "last.ckpt"

    def hparams(*overrides):
        cfg = compose_train(*overrides)
        return Classifier(
            cfg.model, cfg.optimizer, cfg.scheduler, label_smoothing=cfg.label_smoothing
        ).hparams

    with pytest.raises(MnistlabError, match="has already finished its 2 epochs; start a new run, or pass"):
        train(compose_train("debug=limit", "ckpt_path=last"), tmp_path)
    assert (tmp_path / "metrics.json").read_text() == before  # the finished run's record is untouched
    assert resume_checkpoint("last", RunDir(tmp_path), hparams(), max_epochs=3) == str(last)
    with pytest.raises(MnistlabError, match="different label_smoothing"):
        resume_checkpoint("last", RunDir(tmp_path), hparams("label_smoothing=0.2"), max_epochs=3)
    with pytest.raises(MnistlabError, match="is not a readable mnistlab checkpoint"):
        resume_checkpoint(str(ROOT / "pyproject.toml"), RunDir(tmp_path), hparams(), max_epochs=3)
