"""Sweeps on a real SLURM cluster: `make test-slurm` brings up the one-node cluster of
scripts/slurm-local.sh (SLURM_CONF set), runs these, and stops its daemons."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from conftest import DDP_ON_CPU, ROOT, SAME_STEPS, assert_same_training, run_script
from mnistlab.report import report

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
    report(tmp_path)
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


def test_ddp_with_ranks_from_slurm_takes_the_steps_of_one_process(tiny_mnist, tmp_path):
    """Two SLURM tasks of one job are the two DDP processes (Lightning reads the ranks from
    SLURM, starts none of its own) and train as one process of their global batch does."""
    alone = run_script(
        "train.py", "--config-dir", str(tiny_mnist.config_dir), "data=tiny", "debug=limit", *SAME_STEPS,
        f"hydra.run.dir={tmp_path / 'one'}",
    )  # fmt: skip
    assert alone.returncode == 0, alone.stderr[-3000:]
    result = sweep(
        tiny_mnist, "train.py", *SAME_STEPS, *DDP_ON_CPU, "data.batch_size=50",
        "hydra.launcher.tasks_per_node=2", "hydra.launcher.mem_gb=6", f"hydra.sweep.dir={tmp_path / 'ddp'}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (job_log,) = (tmp_path / "ddp" / ".submitit").glob("*/*_0_log.err")  # rank 0's stderr
    assert "MEMBER: 1/2" in job_log.read_text()  # ranks 0 and 1 joined one process group
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir() if p.is_dir()) == [".submitit", "0"]
    assert_same_training(tmp_path / "one", tmp_path / "ddp" / "0")


def test_a_cancelled_slurm_job_resubmitted_with_ckpt_path_last_ends_as_if_never_stopped(tiny_mnist, tmp_path):
    """`scancel` sends SIGTERM: the run saves last.ckpt, records `interrupted` and exits; the same
    sweep again with ckpt_path=last continues it to the weights of a run never stopped."""
    common = ["data=tiny", "debug=limit", "trainer.max_epochs=4", *SAME_STEPS]
    alone = run_script(
        "train.py", "--config-dir", str(tiny_mnist.config_dir), *common, f"hydra.run.dir={tmp_path / 'one'}"
    )
    assert alone.returncode == 0, alone.stderr[-3000:]
    marker = tmp_path / "paused"
    launch = [
        sys.executable, "train.py", "-m", "--config-dir", str(tiny_mnist.config_dir), *common,
        "hydra/launcher=local_slurm", f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]  # fmt: skip
    pause = ["+callbacks.pause._target_=crash.PauseAtEpochStart", "+callbacks.pause.epoch=2",
             f"+callbacks.pause.marker={marker}"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    first = subprocess.Popen([*launch, *pause], cwd=ROOT, env=env, **pipes)
    deadline = time.monotonic() + 300
    while not marker.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert marker.exists(), first.communicate()[1].decode()[-3000:]
    (job,) = {p.name.split("_")[0] for p in (tmp_path / "sweep" / ".submitit").glob("*/*_submitted.pkl")}
    subprocess.run(["scancel", job], check=True)
    _, err = first.communicate(timeout=300)
    assert first.returncode != 0
    record = json.loads((tmp_path / "sweep" / "0" / "metrics.json").read_text())
    assert record["status"] == "interrupted" and "SIGTERM" in record["error"], record

    again = subprocess.run(
        [*launch, "ckpt_path=last"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_training(tmp_path / "one", tmp_path / "sweep" / "0")
