"""The task behind `search.py`: an Optuna TPE study whose trials are ordinary training runs.

Each trial composes the `train` config with the search's own overrides plus the trial's
sampled values, runs the same task as `train.py` in `<study dir>/trial_NNN/`, and reports
per-epoch `val/acc` so a median pruner can stop weak trials early.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from pathlib import Path

import lightning as L
import optuna
import sqlalchemy.exc
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from mnistlab import MnistlabError, as_integer, instantiate
from mnistlab.models import count_params, shape_layers
from mnistlab.train import train

log = logging.getLogger(__name__)
SEARCH_KEYS = ("hparams_search", "n_trials", "storage", "hydra.")


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


FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
COUNTED = (*FINISHED, optuna.trial.TrialState.RUNNING)  # finished, or taking a place now


def counts(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether a trial takes one of the study's `n_trials` places: a shape refused over the
    parameter cap costs milliseconds and does not, or a tight cap would fill the study with them."""
    return trial.state in COUNTED and "over_budget" not in trial.user_attrs


def run_trials(study: optuna.Study, objective, n_trials: int) -> None:
    """Trials until the study holds `n_trials` finished ones, with any number of workers (processes,
    machines) sharing its storage. The storage numbers trials atomically, so a trial goes ahead only
    if fewer than `n_trials` earlier ones are finished or running; one that lost that race to
    another worker is closed as failed without running (user attribute `not_run`)."""

    def taken(before: int | None = None) -> int:
        trials = study.get_trials(deepcopy=False)
        return sum(counts(t) and (before is None or t.number < before) for t in trials)

    while taken() < n_trials:
        trial = study.ask()
        if taken(before=trial.number) >= n_trials:
            trial.set_user_attr("not_run", "the study was full")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return
        try:
            value = objective(trial)
        except optuna.TrialPruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        except MnistlabError as e:  # this trial's settings failed (diverged, ...): the study goes on
            log.warning("trial %d failed: %s", trial.number, e)
            trial.set_user_attr("error", str(e))
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        except BaseException:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        else:
            study.tell(trial, value)


def sqlite_storage(url: str) -> optuna.storages.RDBStorage:
    """An sqlite study file that workers share. Two workers started at once on a new file can both
    try to write its tables; the one that loses finds the file made, so it opens it again."""
    for attempt in range(3):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError):  # "already exists"
            if attempt == 2:
                raise
            time.sleep(1)


def search(cfg: DictConfig) -> optuna.Study:
    space = cfg.hparams_search
    if not as_integer(cfg.n_trials) >= 1:
        raise MnistlabError(f"n_trials={cfg.n_trials!r} is not allowed; use an integer >= 1")
    study_dir = Path(HydraConfig.get().runtime.output_dir)
    base = [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith(SEARCH_KEYS)]
    storage = cfg.storage
    if storage and str(storage).startswith("sqlite"):  # workers sharing the file wait for its lock
        storage = sqlite_storage(str(storage))
    try:
        study = optuna.create_study(
            study_name=space.study_name,
            storage=storage,
            load_if_exists=True,
            direction=space.direction,
            # seeded per process: workers sharing a study would otherwise sample the same values
            sampler=optuna.samplers.TPESampler(seed=cfg.seed if not cfg.storage else cfg.seed + os.getpid()),
            pruner=optuna.pruners.MedianPruner(**space.get("pruner", {})),
        )
    except (ValueError, ImportError, sqlalchemy.exc.SQLAlchemyError) as e:
        raise MnistlabError(
            f"storage={cfg.storage} cannot be opened ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
            "pass storage=sqlite:///logs/<study>.db or a PostgreSQL/MySQL URL"
        ) from None
    if space.get("shape") and space.get("max_params"):
        check_some_shape_fits(space, base)
    done = sum(t.state in FINISHED and counts(t) for t in study.get_trials(deepcopy=False))
    log.info(
        "study %s: %d of %d trials done; this worker in %s", space.study_name, done, cfg.n_trials, study_dir
    )

    def objective(trial: optuna.Trial) -> float:
        sampled = [f"{name}={suggest(trial, name, spec)}" for name, spec in space.params.items()]
        if space.get("shape"):
            shape = {name: suggest(trial, f"shape.{name}", spec) for name, spec in space.shape.items()}
            sampled.append(layers_override(shape))
        trial_dir = study_dir / f"trial_{trial.number:03d}"
        trial_cfg = compose("train", overrides=[*base, *sampled], return_hydra_config=True)
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
        with open_dict(trial_cfg):
            trial_cfg.hydra.runtime.output_dir = str(trial_dir)
        HydraConfig.instance().set_config(trial_cfg)
        with open_dict(trial_cfg):
            del trial_cfg["hydra"]  # as a Hydra app's task sees it; ${hydra:...} reads HydraConfig
        (trial_dir / ".hydra").mkdir(parents=True, exist_ok=True)
        OmegaConf.save(trial_cfg, trial_dir / ".hydra" / "config.yaml")
        OmegaConf.save(OmegaConf.create([*base, *sampled]), trial_dir / ".hydra" / "overrides.yaml")
        reporter = ReportToTrial(trial)
        metrics = train(trial_cfg, callbacks=[reporter])
        if reporter.pruned:
            raise optuna.TrialPruned()
        return metrics[space.metric]

    run_trials(study, objective, cfg.n_trials)
    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
        raise MnistlabError(
            f"no trial of study {space.study_name} finished; see the trial logs in {study_dir}"
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
