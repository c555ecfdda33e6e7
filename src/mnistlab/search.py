"""The task behind `search.py`: an Optuna TPE study whose trials are ordinary training runs.

Each trial composes the `train` config with the search's own overrides plus the trial's
sampled values, runs the same task as `train.py` in `<study dir>/trial_NNN/`, and reports
per-epoch `val/acc` so a median pruner can stop weak trials early.

Storages: none (in memory, one process); `journal:PATH` (Optuna's journal file: any number of
workers on one machine or a shared disk); `sqlite:///PATH` (one worker at a time is safest);
`postgresql://...` (workers on many machines). A trial whose worker died holds no place for
good: on one machine it is reclaimed as soon as its process is gone (the trial records the
worker's pid, start and host); with a database, also once its heartbeat is older than
`grace_period` seconds (another machine). A reclaimed trial fails and its parameters run again.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
import warnings
from pathlib import Path

import lightning as L
import optuna
import sqlalchemy.exc
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from mnistlab import MnistlabError, as_integer, instantiate
from mnistlab.models import count_params, shape_layers
from mnistlab.runs import RunDir, process_alive, this_process
from mnistlab.train import train

log = logging.getLogger(__name__)
SEARCH_KEYS = ("hparams_search", "n_trials", "storage", "heartbeat_interval", "grace_period", "hydra.")


class ReportToTrial(L.Callback):
    """Reports each epoch's val/acc to the trial; stops training once the pruner says so."""

    def __init__(self, trial: optuna.Trial, metric: str = "val/acc"):
        self.trial, self.metric, self.pruned = trial, metric, False

    def on_validation_epoch_end(self, trainer, module):
        value = trainer.callback_metrics.get(self.metric)
        if trainer.sanity_checking or value is None:
            return
        self.trial.report(float(value), step=trainer.current_epoch)
        if self.trial.should_prune():
            self.pruned = True
            trainer.should_stop = True


def suggest(trial: optuna.Trial, name: str, spec: DictConfig):
    if spec.type == "float":
        return trial.suggest_float(name, spec.low, spec.high, log=spec.get("log", False))
    if spec.type == "int":
        return trial.suggest_int(name, spec.low, spec.high, log=spec.get("log", False))
    if spec.type == "categorical":
        return trial.suggest_categorical(name, list(spec.choices))
    raise MnistlabError(f"hparams_search.params.{name}.type={spec.type!r}; use float, int or categorical")


def network_shape(shape: dict) -> dict:
    """A trial's `shape` values -> the arguments of `models.shape_layers`."""
    return {
        "widths": [shape[f"width{i}"] for i in (1, 2, 3)],
        "convs": [shape[f"convs{i}"] for i in (1, 2, 3)],
        "conv": shape.get("conv", "conv"),
        "transition": bool(shape.get("transition", False)),
    }


def layers_override(shape: dict) -> str:
    """A trial's `shape` values as the train.py override of the network they stand for."""
    return "model.layers=[" + ",".join(f"'{line}'" for line in shape_layers(**network_shape(shape))) + "]"


def check_some_shape_fits(space: DictConfig, base: list[str]) -> None:
    """Refuses a search whose smallest shape is over `max_params` (every int at its low end, every
    categorical choice tried) before any trial: it could only refuse trials forever."""
    ints = {k: v.low for k, v in space.shape.items() if v.type == "int"}
    choices = {k: list(v.choices) for k, v in space.shape.items() if v.type == "categorical"}

    def params(shape: dict) -> int:
        return count_params(instantiate(compose("train", overrides=[*base, layers_override(shape)]).model))

    smallest = min(
        params({**ints, **dict(zip(choices, values, strict=True))})
        for values in itertools.product(*choices.values())
    )
    if smallest > space.max_params:
        raise MnistlabError(
            f"the smallest shape of hparams_search.shape has {smallest} parameters, over max_params "
            f"{space.max_params}; raise hparams_search.max_params or lower the shape's ranges"
        )


FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
COUNTED = (*FINISHED, TrialState.RUNNING)  # finished, or taking a place now
with warnings.catch_warnings():  # "experimental" since Optuna 2.8: the callback Optuna documents for this
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    RETRY = RetryHeartbeatStaleTrialCallback(
        max_retry=3
    )  # a lost trial's parameters run again, up to 3 times


def counts(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a trial takes one of the study's `n_trials` places: a shape refused over the
    parameter cap costs milliseconds and does not, or a tight cap would fill the study with them."""
    return trial.state in COUNTED and "over_budget" not in trial.user_attrs


def reclaim_lost_trials(study: optuna.Study) -> None:
    """Fails the running trials whose worker process is gone (on this machine: `kill -9`, an
    out-of-memory kill) and queues their parameters again; a database's heartbeat does the same
    for workers on other machines once `grace_period` has passed."""
    with warnings.catch_warnings():  # "experimental" since Optuna 2.9, and what study.optimize calls
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # databases only: heartbeats older than the grace period
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker")
        if worker and process_alive(worker) is False:
            try:
                study.tell(trial.number, state=TrialState.FAIL)
            except (ValueError, RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
                continue  # another worker reclaimed it first
            log.warning(
                "trial %d: its worker (pid %s) is gone; its parameters run again", trial.number, worker["pid"]
            )
            RETRY(study, study.get_trials(deepcopy=False)[trial.number])


class _StudyFull(Exception):
    """This worker's new trial came after the study's places were taken."""


def run_trials(study: optuna.Study, objective, n_trials: int, wait: float = 5.0) -> None:
    """Trials until the study holds `n_trials` finished ones, with any number of workers (processes,
    machines) sharing its storage. The storage numbers trials atomically, so a trial goes ahead only
    if fewer than `n_trials` earlier ones are finished or running; one that lost that race to
    another worker is closed as failed without running (user attribute `not_run`). While other
    workers' trials fill the places, this worker waits: one of them may die and leave its place."""

    def taken(before: int | None = None, states=COUNTED) -> int:
        trials = study.get_trials(deepcopy=False)
        return sum(counts(t) and t.state in states and (before is None or t.number < before) for t in trials)

    def guarded(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", this_process())
        if taken(before=trial.number) >= n_trials:
            trial.set_user_attr("not_run", "the study was full")
            raise _StudyFull
        try:
            return objective(trial)
        except MnistlabError as e:  # this trial's settings failed (diverged, ...): the study goes on
            log.warning("trial %d failed: %s", trial.number, e)
            trial.set_user_attr("error", str(e))
            return float("nan")  # Optuna closes a NaN trial as failed
        except SystemExit:  # SIGTERM, Ctrl-C: this trial failed, its parameters run again later
            study.tell(trial, state=TrialState.FAIL)
            RETRY(study, study.get_trials(deepcopy=False)[trial.number])
            raise

    while True:
        reclaim_lost_trials(study)
        if taken(states=FINISHED) >= n_trials:
            return
        if taken() >= n_trials:  # the rest are running in other workers
            time.sleep(wait)
            continue
        study.optimize(guarded, n_trials=1, catch=(_StudyFull,))


def open_storage(cfg: DictConfig):
    """The study's storage from `storage=`: None (in memory), `journal:PATH`, or a database URL
    (sqlite, PostgreSQL, MySQL) with Optuna's heartbeat and grace period."""
    url = cfg.storage
    if not url:
        return None
    url = str(url)
    if url.startswith("journal:"):
        path = Path(url.removeprefix("journal:").removeprefix("//"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    heartbeat = {
        "heartbeat_interval": int(cfg.heartbeat_interval),
        "grace_period": int(cfg.grace_period),
        "heartbeat_stale_trial_callback": RETRY,
    }
    warnings.filterwarnings(
        "ignore", "Argument ``(heartbeat_interval|grace_period|heartbeat_stale_trial_callback)``"
    )
    if url.startswith("sqlite"):  # workers sharing the file wait for its lock
        # Two workers started at once on a new file can both try to write its tables; the one
        # that loses finds the file made, so it opens it again.
        for attempt in range(3):
            try:
                return optuna.storages.RDBStorage(
                    url, engine_kwargs={"connect_args": {"timeout": 60}}, **heartbeat
                )
            except sqlalchemy.exc.IntegrityError:  # "already exists"
                if attempt == 2:
                    raise
                time.sleep(1)
    return optuna.storages.RDBStorage(url, **heartbeat)


def search(cfg: DictConfig) -> optuna.Study:
    space = cfg.hparams_search
    if not as_integer(cfg.n_trials) >= 1:
        raise MnistlabError(f"n_trials={cfg.n_trials!r} is not allowed; use an integer >= 1")
    base = [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith(SEARCH_KEYS)]
    study_dir = RunDir.from_hydra()
    study_dir.adopt_config()
    try:
        storage = open_storage(cfg)
        study = optuna.create_study(
            study_name=space.study_name,
            storage=storage,
            load_if_exists=True,
            direction=space.direction,
            # seeded per process: workers sharing a study would otherwise sample the same values
            sampler=optuna.samplers.TPESampler(seed=cfg.seed if not cfg.storage else cfg.seed + os.getpid()),
            pruner=optuna.pruners.MedianPruner(**space.get("pruner", {})),
        )
    except (ValueError, ImportError, OSError, sqlalchemy.exc.SQLAlchemyError) as e:
        first = (str(e).splitlines() or [""])[0][:160]
        raise MnistlabError(
            f"storage={cfg.storage} cannot be opened ({type(e).__name__}: {first}); pass a writable "
            "storage=journal:logs/<study>.journal, sqlite:///logs/<study>.db or a PostgreSQL URL"
        ) from None
    if space.get("shape") and space.get("max_params"):
        check_some_shape_fits(space, base)
    done = sum(t.state in FINISHED and counts(t) for t in study.get_trials(deepcopy=False))
    log.info(
        "study %s: %d of %d trials done; this worker in %s",
        space.study_name,
        done,
        cfg.n_trials,
        study_dir.path,
    )

    def objective(trial: optuna.Trial) -> float:
        sampled = [f"{name}={suggest(trial, name, spec)}" for name, spec in space.params.items()]
        if space.get("shape"):
            shape = {name: suggest(trial, f"shape.{name}", spec) for name, spec in space.shape.items()}
            sampled.append(layers_override(shape))
        trial_dir = RunDir(study_dir.path / f"trial_{trial.number:03d}")
        trial_cfg = compose("train", overrides=[*base, *sampled])
        if space.get("max_params"):  # over budget: refused before anything trains
            params = count_params(instantiate(trial_cfg.model))
            trial.set_user_attr("params", params)
            if params > space.max_params:
                trial.set_user_attr("over_budget", True)
                log.info(
                    "trial %d: %d parameters > max_params %d, not trained",
                    trial.number,
                    params,
                    space.max_params,
                )
                raise optuna.TrialPruned()
        trial_cfg.paths.run_dir = str(trial_dir.path)  # its checkpoints and logs go there
        trial_dir.save_config(trial_cfg, [*base, *sampled])
        reporter = ReportToTrial(trial)
        metrics = train(trial_cfg, trial_dir, callbacks=[reporter])
        if reporter.pruned:
            raise optuna.TrialPruned()
        return metrics[space.metric]

    run_trials(study, objective, cfg.n_trials)
    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
        raise MnistlabError(
            f"no trial of study {space.study_name} finished; see the trial logs in {study_dir.path}"
        )
    best = study.best_trial
    sampled = [f"{k}={v}" for k, v in best.params.items() if not k.startswith("shape.")]
    if space.get("shape"):  # a shape is not a config key: give the layers it stands for
        shape = {k.removeprefix("shape."): v for k, v in best.params.items() if k.startswith("shape.")}
        sampled.append(f'"{layers_override(shape)}"')
    overrides = " ".join([*base, *sampled])
    print(f"best trial {best.number}: {space.metric} = {best.value:.4f}")
    print(f"python train.py {overrides}")
    return study
