"""The Optuna search: trials are ordinary runs, and a study in sqlite resumes instead of restarting."""

from __future__ import annotations

import json

import optuna

from conftest import run_script

TINY = ["debug=limit", "trainer.limit_train_batches=2"]


def test_a_study_in_sqlite_continues_where_it_stopped(tiny_mnist, tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"

    def search(n_trials: int, run_dir: str):
        result = run_script(
            "search.py", "--config-dir", str(tiny_mnist.config_dir), "data=tiny", "hparams_search=dropout_lr",
            f"n_trials={n_trials}", f"storage={storage}", *TINY, f"hydra.run.dir={tmp_path / run_dir}",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    search(2, "first")
    trial_dirs = sorted((tmp_path / "first").glob("trial_*"))
    assert [d.name for d in trial_dirs] == ["trial_000", "trial_001"]
    for trial_dir in trial_dirs:
        metrics = json.loads((trial_dir / "metrics.json").read_text())
        assert metrics["status"] == "ok" and (trial_dir / ".hydra" / "config.yaml").is_file()
        assert any((trial_dir / "tensorboard").glob("events.out.tfevents.*"))

    out = search(3, "second")  # the study's total is now 3: one more trial, numbered on from 2
    assert [d.name for d in (tmp_path / "second").glob("trial_*")] == ["trial_002"]
    study = optuna.load_study(study_name="dropout_lr", storage=storage)
    assert len(study.trials) == 3
    values = {t.number: t.value for t in study.trials}
    assert (
        values[2]
        == json.loads((tmp_path / "second" / "trial_002" / "metrics.json").read_text())["val/acc_best"]
    )
    assert out.strip().splitlines()[-1].startswith("python train.py data=tiny ")
    assert "model.dropout=" in out and "optimizer.lr=" in out


def test_a_trial_the_pruner_rejects_stops_after_that_epoch(compose_train):
    from mnistlab.search import ReportToTrial
    from mnistlab.train import train

    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=2.0))
    trial = study.ask()  # every val/acc is below 2.0, so the pruner rejects the first report
    reporter = ReportToTrial(trial)
    metrics = train(compose_train(*TINY, "trainer.max_epochs=3"), callbacks=[reporter])
    assert reporter.pruned and metrics["epochs"] == 1
    assert list(study.trials[0].intermediate_values) == [0]  # reported for epoch 0 only
