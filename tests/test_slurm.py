"""Sweeps on a real SLURM cluster: `make test-slurm` brings up the one-node cluster of
scripts/slurm-local.sh (SLURM_CONF set), runs these, and stops its daemons."""

from __future__ import annotations

import json
import os

import optuna
import pytest
from optuna.trial import TrialState

from conftest import run_script
from mnistlab.report import main as report_main

pytestmark = pytest.mark.slurm


@pytest.fixture(autouse=True, scope="module")
def cluster():
    assert os.environ.get("SLURM_CONF"), "no SLURM_CONF: run make test-slurm (scripts/slurm-local.sh up)"


def sweep(tiny_mnist, script: str, *overrides: str):
    return run_script(
        script, "-m", "--config-dir", str(tiny_mnist.config_dir), "data=tiny", "debug=limit",
        "hydra/launcher=local_slurm", *overrides, timeout=900,
    )  # fmt: skip


def test_a_slurm_sweep_leaves_one_finished_run_per_job_and_make_report_reads_them(tiny_mnist, tmp_path):
    result = sweep(
        tiny_mnist, "train.py", "seed=1,2", "model.dropout=0.05,0.1", f"hydra.sweep.dir={tmp_path}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sacct" not in result.stderr + result.stdout  # accounting is on: no "Bypassing sacct error"
    for job in "0123":
        run = tmp_path / job
        assert json.loads((run / "metrics.json").read_text())["status"] == "ok"
        assert list((run / "tensorboard").glob("events.out.tfevents.*"))
        assert (run / "checkpoints" / "last.ckpt").is_file()
    assert len(list((tmp_path / ".submitit").glob("*/*_submitted.pkl"))) == 4  # four SLURM array tasks
    report_main([str(tmp_path)])
    rows = [line for line in (tmp_path / "report.md").read_text().splitlines() if line.startswith("| `")]
    assert len(rows) == 2 and all(row.split("|")[-3].strip() == "2" for row in rows)  # 2 seeds per dropout


def test_a_failing_slurm_job_is_named_and_the_sweep_exits_1(tiny_mnist, tmp_path):
    result = sweep(
        tiny_mnist, "train.py", "optimizer=sgd", "scheduler=none", "optimizer.lr=0.01,1e30",
        f"hydra.sweep.dir={tmp_path}",
    )  # fmt: skip
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("error: 1 job(s) failed: job 1 (")
        and "optimizer.lr=1e+30" in last
        and "diverged" in last
    )
    statuses = [json.loads((tmp_path / j / "metrics.json").read_text())["status"] for j in "01"]
    assert statuses == ["ok", "failed"]


def test_search_workers_as_slurm_jobs_share_one_study_of_exactly_n_trials(tiny_mnist, tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    result = sweep(
        tiny_mnist, "search.py", "+worker=1,2", "hparams_search=dropout_lr", "n_trials=4",
        f"storage={storage}", "trainer.limit_train_batches=2", f"hydra.sweep.dir={tmp_path}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="dropout_lr", storage=storage)
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 4
    ran = sorted(p.parent.name for p in tmp_path.glob("*/trial_*/metrics.json"))
    assert ran == sorted(f"trial_{t.number:03d}" for t in finished)
