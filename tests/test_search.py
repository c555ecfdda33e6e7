"""The Optuna search: trials are ordinary runs, and a study in sqlite resumes instead of restarting."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from hydra import initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from optuna.trial import TrialState

from conftest import CONF, ROOT, compose_tiny
from mnistlab import MnistlabError
from mnistlab.models import shape_layers
from mnistlab.search import search

TINY = ["debug=limit", "trainer.limit_train_batches=2"]


def test_a_study_in_sqlite_continues_where_it_stopped(tiny_mnist, tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 'study.db'}"

    def search_in(run_dir: str, n_trials: int) -> str:
        overrides = ["hparams_search=dropout_lr", f"n_trials={n_trials}", f"storage={storage}", *TINY]
        cfg = compose_tiny(tiny_mnist, tmp_path / run_dir, *overrides, config_name="search")
        with initialize_config_dir(str(CONF), version_base="1.3"):  # trials compose `train` from here
            search(cfg)
        return capsys.readouterr().out

    search_in("first", 2)
    assert HydraConfig.get().runtime.output_dir == str(tmp_path / "first")  # trials leave it alone
    trial_dirs = sorted((tmp_path / "first").glob("trial_*"))
    assert [d.name for d in trial_dirs] == ["trial_000", "trial_001"]
    for trial_dir in trial_dirs:  # each trial's checkpoints, logs and config in its own folder
        metrics = json.loads((trial_dir / "metrics.json").read_text())
        assert metrics["status"] == "ok" and (trial_dir / metrics["checkpoint"]).is_file()
        assert OmegaConf.load(trial_dir / ".hydra" / "config.yaml").paths.run_dir == str(trial_dir)
        assert any((trial_dir / "tensorboard").glob("events.out.tfevents.*"))
        assert (trial_dir / "csv" / "metrics.csv").is_file()

    out = search_in("second", 3)  # the study's total is now 3: one more trial, numbered on from 2
    assert [d.name for d in (tmp_path / "second").glob("trial_*")] == ["trial_002"]
    study = optuna.load_study(study_name="dropout_lr", storage=storage)
    assert len(study.trials) == 3
    values = {t.number: t.value for t in study.trials}
    trial_2 = json.loads((tmp_path / "second" / "trial_002" / "metrics.json").read_text())
    assert values[2] == trial_2["val/acc_best"]
    assert out.strip().splitlines()[-1].startswith("python train.py data.data_dir=")
    assert "model.dropout=" in out and "optimizer.lr=" in out


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("n_trials=-1", "n_trials=-1 is not allowed; use an integer >= 1"),
        ("storage=bogus://x", "storage=bogus://x cannot be opened"),
    ],
)
def test_bad_search_settings_are_one_clear_error(compose_train, override, message):
    with pytest.raises(MnistlabError) as error:
        search(compose_train("hparams_search=dropout_lr", override, config_name="search"))
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_a_trial_the_pruner_rejects_stops_after_that_epoch(compose_train, tmp_path):
    from mnistlab.search import ReportToTrial
    from mnistlab.train import train

    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=2.0))
    trial = study.ask()  # every val/acc is below 2.0, so the pruner rejects the first report
    reporter = ReportToTrial(trial)
    metrics = train(compose_train(*TINY, "trainer.max_epochs=3"), tmp_path, callbacks=[reporter])
    assert reporter.pruned and metrics["epochs"] == 1
    assert list(study.trials[0].intermediate_values) == [0]  # reported for epoch 0 only


def test_a_space_whose_smallest_shape_is_over_the_cap_is_refused_before_any_trial(tiny_mnist, tmp_path):
    overrides = ["hparams_search=shape", "hparams_search.max_params=300", "n_trials=3", *TINY]
    cfg = compose_tiny(tiny_mnist, tmp_path, *overrides, config_name="search")
    message = "the smallest shape of hparams_search.shape has 328 parameters, over max_params 300; raise"
    with initialize_config_dir(str(CONF), version_base="1.3"), pytest.raises(MnistlabError, match=message):
        search(cfg)  # widths 4, 6, 8, one sepconv each, no transition: 328 parameters
    assert not list(tmp_path.glob("trial_*"))  # nothing trained, no trial started


def test_shapes_over_the_cap_are_refused_untrained_and_do_not_take_the_studys_places(tiny_mnist, tmp_path):
    # widths 4, 6 and 8-32, one sepconv a stage: 328-760 parameters without the 1x1 transitions,
    # 506-2186 with them; the cap of 700 refuses about half of the shapes
    fixed = [f"hparams_search.shape.{k}={{type:int,low:{v},high:{v}}}" for k, v in
             {"width1": 4, "width2": 6, "convs1": 1, "convs2": 1, "convs3": 1}.items()]  # fmt: skip
    sepconv = "hparams_search.shape.conv={type:categorical,choices:[sepconv]}"
    overrides = [
        "hparams_search=shape",
        "hparams_search.max_params=700",
        "n_trials=3",
        *fixed,
        sepconv,
        *TINY,
    ]
    cfg = compose_tiny(tiny_mnist, tmp_path, *overrides, config_name="search")
    with initialize_config_dir(str(CONF), version_base="1.3"):
        study = search(cfg)
    refused = [t for t in study.trials if t.user_attrs.get("over_budget")]
    trained = [t for t in study.trials if not t.user_attrs.get("over_budget")]
    assert refused and all(t.state == TrialState.PRUNED and t.user_attrs["params"] > 700 for t in refused)
    assert len(trained) == 3 and all(t.user_attrs["params"] <= 700 for t in trained)
    assert len(list(tmp_path.glob("trial_*/metrics.json"))) == 3  # only the trained ones wrote a run


def test_a_shape_under_the_cap_trains_the_network_it_describes(tiny_mnist, tmp_path, capsys):
    shape = {"width1": 4, "width2": 6, "width3": 8, "convs1": 1, "convs2": 2, "convs3": 1}
    fixed = [f"hparams_search.shape.{k}={{type:int,low:{v},high:{v}}}" for k, v in shape.items()]
    sepconv = "hparams_search.shape.conv={type:categorical,choices:[sepconv]}"
    overrides = ["hparams_search=shape", "n_trials=1", *fixed, sepconv, *TINY]
    cfg = compose_tiny(tiny_mnist, tmp_path, *overrides, config_name="search")
    with initialize_config_dir(str(CONF), version_base="1.3"):
        study = search(cfg)
    (trial,) = study.trials
    transition = trial.params["shape.transition"]
    layers = shape_layers([4, 6, 8], [1, 2, 1], "sepconv", transition)
    trained = OmegaConf.load(tmp_path / "trial_000" / ".hydra" / "config.yaml")
    assert list(trained.model.layers) == layers
    metrics = json.loads((tmp_path / "trial_000" / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["params"] == trial.user_attrs["params"] <= 8000
    # the command printed for the best trial trains that network (a shape is no config key)
    command = capsys.readouterr().out.strip().splitlines()[-1]
    assert command.startswith("python train.py") and "shape." not in command
    assert '"model.layers=[' + ",".join(f"'{line}'" for line in layers) + ']"' in command


def search_command(tiny_mnist, run_dir, storage: str, n_trials: int) -> list[str]:
    return [sys.executable, "search.py", "--config-dir", str(tiny_mnist.config_dir), "data=tiny",
            "hparams_search=dropout_lr", f"n_trials={n_trials}", f"storage={storage}", *TINY,
            f"hydra.run.dir={run_dir}"]  # fmt: skip


def journal(path) -> optuna.storages.JournalStorage:
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))


@pytest.mark.integration
def test_two_workers_at_once_finish_one_study_with_exactly_n_trials(tiny_mnist, tmp_path):
    """Two `search.py` processes on one journal file, started together: 5 finished trials in all,
    each run once, in one worker's directory."""
    storage = f"journal:{tmp_path / 'shared.journal'}"
    workers = [
        subprocess.Popen(
            search_command(tiny_mnist, tmp_path / f"worker{i}", storage, 5),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    study = optuna.load_study(study_name="dropout_lr", storage=journal(tmp_path / "shared.journal"))
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 5
    ran = sorted(p.parent.name for p in tmp_path.glob("worker*/trial_*/metrics.json"))
    assert ran == sorted(f"trial_{t.number:03d}" for t in finished)  # each finished trial ran once
    unfinished = [t for t in study.trials if t not in finished]
    assert all(t.user_attrs.get("not_run") for t in unfinished), [  # at most the one that lost the race
        (t.number, t.state.name, t.user_attrs) for t in unfinished
    ]


@pytest.mark.integration
def test_a_trial_whose_worker_was_killed_is_reclaimed_and_the_study_still_ends_with_n_trials(
    tiny_mnist, tmp_path
):
    """The issue's case: `kill -9` during trial 1, then the same command again. The killed trial
    fails (it does not hold its place as RUNNING for good), its parameters run again, and the
    study ends with exactly n_trials finished ones."""
    storage = f"journal:{tmp_path / 'study.journal'}"
    first = subprocess.Popen(search_command(tiny_mnist, tmp_path / "first", storage, 3), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while not (tmp_path / "first" / "trial_001" / "metrics.json").is_file():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0][-3000:]
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    study = optuna.load_study(study_name="dropout_lr", storage=journal(tmp_path / "study.journal"))
    killed = study.trials[1]
    assert killed.state == TrialState.RUNNING  # as the kill left it

    again = subprocess.run(search_command(tiny_mnist, tmp_path / "again", storage, 3), cwd=ROOT,
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    said = again.stdout + again.stderr  # the log goes to the console and search.log
    assert "trial 1: its worker (pid" in said and "is gone; its parameters run again" in said
    study = optuna.load_study(study_name="dropout_lr", storage=journal(tmp_path / "study.journal"))
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 3 and study.trials[1].state == TrialState.FAIL
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    (retried,) = [t for t in finished if t.system_attrs.get("failed_trial") == 1]
    assert retried.params == killed.params


def test_a_storage_in_a_read_only_folder_is_one_clear_error(compose_train, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.access(locked, os.W_OK):
        pytest.skip("this user writes anywhere (root): a read-only folder cannot be made")
    for storage in (f"journal:{locked / 'study.journal'}", f"sqlite:///{locked / 'study.db'}"):
        with pytest.raises(MnistlabError) as error:
            search(compose_train("hparams_search=dropout_lr", f"storage={storage}", config_name="search"))
        assert str(error.value).startswith(f"storage={storage} cannot be opened")
        assert "pass a writable storage=" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.postgres
def test_two_workers_and_a_killed_one_on_postgresql_end_with_exactly_n_trials(tiny_mnist, tmp_path):
    """Many machines share a study through a database (`make test-postgres` starts a local
    PostgreSQL with scripts/postgres-local.sh): a worker killed mid-trial, then two more; the
    dead worker's trial is failed and rerun, and the study ends with exactly 4 finished trials."""
    url = os.environ.get("MNISTLAB_POSTGRES_URL", "postgresql://postgres@127.0.0.1:55432/mnistlab")
    name = f"pg_{os.getpid()}_{time.time_ns()}"
    study_name = f"hparams_search.study_name={name}"
    beat = ["heartbeat_interval=1", "grace_period=5"]

    def worker(label: str) -> subprocess.Popen:
        command = [*search_command(tiny_mnist, tmp_path / label, url, 4), study_name, *beat]
        return subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

    killed = worker("killed")
    deadline = time.monotonic() + 300
    while not list((tmp_path / "killed").glob("trial_*/metrics.json")):
        assert killed.poll() is None and time.monotonic() < deadline, killed.communicate()[0][-3000:]
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    workers = [worker("a"), worker("b")]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    study = optuna.load_study(study_name=name, storage=url)
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 4 and not [t for t in study.trials if t.state == TrialState.RUNNING]
    lost = [t for t in study.trials if t.state == TrialState.FAIL and not t.user_attrs.get("not_run")]
    assert len(lost) == 1 and lost[0].user_attrs["worker"]["pid"] == killed.pid
    assert any(t.system_attrs.get("failed_trial") == lost[0].number for t in finished)  # its rerun
