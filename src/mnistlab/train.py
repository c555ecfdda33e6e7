"""The training task behind `train.py`: seed -> data -> model -> trainer -> fit -> test -> metrics.json.

Everything that can be checked is checked before the first batch (each value by the code that
owns it: the data module, the network builder, the module, the Trainer), so a bad override
costs a second, not an epoch.
"""

from __future__ import annotations

import inspect
import logging
import shutil
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_object
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from mnistlab import MnistlabError, as_integer, instantiate, lightning_trainer_defaults
from mnistlab.files import AtomicCheckpointIO
from mnistlab.models import count_params
from mnistlab.module import Classifier
from mnistlab.precision import device_type, trainer_precision
from mnistlab.runs import (
    RunDir,
    RunRecord,
    StoppedBeforeStart,
    flat_hparams,
    machine,
    resume_checkpoint,
    source_commit,
)
from mnistlab.summary import format_table

log = logging.getLogger(__name__)


def build_trainer(
    cfg: DictConfig, callbacks: list[L.Callback] = (), recorded_precision: str | None = None, **overrides
) -> L.Trainer:
    """The configured Trainer, with checkpoints written atomically, `trainer.precision=auto`
    resolved for this machine (or kept as `recorded_precision`, a run's own: `run_precision`),
    and no live progress bar where nobody watches one (a pipe, a file, CI)."""
    if "precision" not in overrides:
        overrides["precision"], why = run_precision(cfg, recorded_precision)
        log.info("precision: %s (%s)", overrides["precision"], why)
    callbacks = [*(instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c), *callbacks]
    loggers = [instantiate(lg) for lg in (cfg.get("logger") or {}).values() if lg]
    if cfg.get("data") and cfg.data.val_size == 0:
        overrides["limit_val_batches"] = 0
    if cfg.trainer.get("enable_progress_bar") is None and not sys.stdout.isatty():
        overrides["enable_progress_bar"] = False
    try:
        return instantiate(
            cfg.trainer,
            callbacks=callbacks,
            logger=loggers or False,
            plugins=[AtomicCheckpointIO()],
            **overrides,
        )
    except InstantiationException as e:
        if not isinstance(e.__cause__, MisconfigurationException):
            raise
        first = str(e.__cause__).split(". ")[0].strip()
        raise MnistlabError(
            f"trainer.accelerator={cfg.trainer.accelerator}: {first}; use trainer.accelerator=auto or cpu"
        ) from None


def stress_test(trainer: L.Trainer, model: L.LightningModule, data_cfg: DictConfig, ckpt_path=None) -> dict:
    """`stress/*`: the model tested on the stress test set; with a validation split, also
    `stress_val/*` on its stressed copy, the figure to choose by. Logged under those names, never
    as `test/*`. MNIST digits only: other data gets no stress figures."""
    if not data_cfg.get("digits"):
        log.info("stress sets: distorted MNIST digits, not made for this dataset (data.digits=false)")
        return {}
    results = {}
    for name in ("stress", "stress_val") if data_cfg.val_size else ("stress",):
        datamodule = instantiate(data_cfg, test_set=name)
        model.test_prefix = name
        try:
            (metrics,) = trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
        finally:
            model.test_prefix = "test"
        results |= metrics
    return results


def data_facts(datamodule) -> dict:
    """What a network trained on `datamodule` takes and gives, saved in its checkpoints."""
    return {
        "num_classes": datamodule.num_classes,
        "input_shape": datamodule.input_shape,
        "mean": datamodule.mean,
        "std": datamodule.std,
        "digits": datamodule.digits,
    }


def has_cxx_compiler() -> bool:
    """torch.compile on the CPU writes C++: without a compiler the network trains uncompiled."""
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def will_compile(cfg: DictConfig) -> bool:
    """Whether this run's network will be compiled (`precision=auto` on a CPU depends on it)."""
    on_cpu = device_type(cfg.trainer.get("accelerator", "auto")) == "cpu"
    return bool(cfg.get("compile")) and (not on_cpu or has_cxx_compiler())


def run_precision(cfg: DictConfig, recorded: str | None) -> tuple[str, str]:
    """The precision to train or test in, and why: `auto` resolved for this machine, except for
    a run that already trained in one (a resumed run, its checkpoint tested again), which keeps
    it, so that its epochs and figures come from one arithmetic."""
    if recorded and str(cfg.trainer.get("precision")) == "auto":
        return recorded, f"trainer.precision=auto: the run trained in {recorded}"
    return trainer_precision(cfg.trainer, compiled=will_compile(cfg))


def compile_network(net: torch.nn.Module, device: torch.device) -> None:
    """torch.compile the network in place (its state_dict keeps plain names), where it can be."""
    if device.type == "cpu" and not has_cxx_compiler():
        log.info("compile: no C++ compiler found, training the network uncompiled")
        return
    net.compile()


def check_arguments(config: DictConfig, group: str, ignore: tuple[str, ...] = ()) -> None:
    """Every key of an optimizer or scheduler config is an argument of its class: a misspelt one
    (`+optimizer.lrr=0.1`) is refused now, not as a TypeError once training starts."""
    target = get_object(config._target_)
    parameters = inspect.signature(target).parameters
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    for key in config:
        if not str(key).startswith("_") and key not in ignore and key not in parameters:
            known = ", ".join(name for name in parameters if name not in ("self", "params", "optimizer"))
            raise MnistlabError(
                f"{group}.{key} is not an argument of {config._target_} (it takes {known}); "
                "remove it or correct its name"
            )


def check_seed(seed) -> int:
    if not 0 <= as_integer(seed) < 2**32:
        raise MnistlabError(f"seed={seed!r} is not allowed; use an integer in [0, 4294967295]")
    return seed


def chosen_config(cfg: DictConfig) -> str:
    """The config as YAML, without what a reader need not see: Trainer arguments left at
    Lightning's defaults, and callbacks and loggers by name only."""
    shown = OmegaConf.to_container(cfg, resolve=True)
    defaults = lightning_trainer_defaults()
    shown["trainer"] = {k: v for k, v in shown["trainer"].items() if k not in defaults or v != defaults[k]}
    for key in ("callbacks", "logger"):
        shown[key] = [name for name, value in (shown.get(key) or {}).items() if value]
    return OmegaConf.to_yaml(shown)


@contextmanager
def sigterm_raises():
    """SIGTERM raises `SIGTERMException` wherever it lands (fetching data, setting up, testing),
    so a run ends with its state recorded and temporary files (a download) removed on the way out.
    Inside the fit loop Lightning's own handler runs first and stops at the next batch; this one
    then leaves it to Lightning. Yields the function that tells it the Trainer."""
    trainers: list[L.Trainer] = []
    if threading.current_thread() is not threading.main_thread():
        yield trainers.append
        return

    def handler(signum, frame):
        if not (trainers and trainers[-1].received_sigterm):
            raise SIGTERMException

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield trainers.append
    finally:
        signal.signal(signal.SIGTERM, previous)


def train(cfg: DictConfig, run_dir: RunDir | str | Path, callbacks: list[L.Callback] = ()) -> dict:
    """Fit, test the checkpoint with the best `val/acc` (the last one when there is no
    validation set), and write `metrics.json` in `run_dir`. Returns the metrics.

    The directory is locked for this process first (a second one is refused at once), and
    nothing in it changes until every check has passed: a run refused or stopped before then
    leaves the directory as it was."""
    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    # checkpoints and loggers write to ${paths.run_dir}: this directory
    OmegaConf.update(cfg, "paths.run_dir", str(run_dir.path), force_add=True)
    owner = rank_zero_only.rank == 0  # DDP: the other ranks work in rank 0's directory
    with sigterm_raises() as watch:
        if owner:
            run_dir.lock()
        try:
            return _train(cfg, run_dir, callbacks, watch)
        finally:
            if owner:
                run_dir.unlock()


def _train(cfg: DictConfig, run_dir: RunDir, callbacks: list[L.Callback], watch) -> dict:
    try:
        seed = check_seed(cfg.seed)
        L.seed_everything(seed, workers=True, verbose=False)  # the printed config shows it
        datamodule = instantiate(cfg.data, shuffle_seed=seed)  # the run's seed orders its batches
        datamodule.prepare_data()  # the files are read here to learn the images' shape
        teachers = instantiate(cfg.distill) if cfg.get("distill") else None  # conf/distill/
        model = Classifier(
            cfg.model, cfg.optimizer, cfg.scheduler, label_smoothing=cfg.label_smoothing,
            metrics=cfg.get("metrics"), data=data_facts(datamodule), distillation=teachers,
        )  # fmt: skip
        epochs, batches = cfg.trainer.max_epochs, cfg.trainer.get("limit_train_batches")
        if not as_integer(epochs) >= 1:
            raise MnistlabError(f"trainer.max_epochs={epochs!r} is not allowed; use an integer >= 1")
        if batches is not None and batches == 0:
            raise MnistlabError("trainer.limit_train_batches=0 trains nothing; use a value above 0")
        check_arguments(cfg.optimizer, "optimizer")
        if cfg.scheduler:
            check_arguments(cfg.scheduler, "scheduler", ignore=("interval",))
        resume_path = resume_checkpoint(cfg.get("ckpt_path"), run_dir, model.hparams, epochs)
        recorded = run_dir.read_metrics().get("precision") if resume_path else None
        precision, precision_why = run_precision(cfg, recorded)
        trainer = build_trainer(cfg, callbacks, precision=precision)
    except (KeyboardInterrupt, SIGTERMException) as e:  # a fetch or a check stopped: nothing recorded
        how = "SIGTERM" if isinstance(e, SIGTERMException) else "Ctrl-C"
        raise StoppedBeforeStart(how) from None
    watch(trainer)
    run_dir.adopt_config()  # accepted: from here on the run directory is this run's
    record = RunRecord(
        run_dir,
        seed=seed,
        params=count_params(model.net),
        commit=source_commit(),
        machine=machine(trainer.strategy.root_device),
        precision=precision,
        precision_why=precision_why,
        **({"teacher": teachers.record()} if teachers else {}),
    )
    trainer.callbacks.append(record)
    try:
        log.info("run directory: %s\n%s", run_dir.path, chosen_config(cfg))
        log.info("precision: %s (%s)", precision, precision_why)
        log.info("model:\n%s", format_table(model.net, model.hparams.data["input_shape"]))
        if cfg.compile:
            compile_network(model.net, trainer.strategy.root_device)
            for teacher in teachers.nets if teachers else ():
                compile_network(teacher, trainer.strategy.root_device)
        trainer.fit(model, datamodule=datamodule, ckpt_path=resume_path)
        val_best = trainer.callback_metrics.get("val/acc_best")
        monitored_first = sorted(trainer.checkpoint_callbacks, key=lambda c: c.monitor is None)
        best = next((Path(c.best_model_path) for c in monitored_first if c.best_model_path), None)
        best = run_dir.checkpoints / best.name if best else None  # a moved run's files moved too
        (test,) = trainer.test(model, datamodule=datamodule, ckpt_path=best, verbose=False)
        test |= stress_test(trainer, model, cfg.data, ckpt_path=best)
    except MnistlabError as e:
        record.end("failed", error=str(e))
        raise
    except (KeyboardInterrupt, SystemExit) as e:  # Lightning turns Ctrl-C into SystemExit(1)
        how = "SIGTERM" if isinstance(e, SIGTERMException) else "interrupted (Ctrl-C)"
        record.end("interrupted", error=f"{how}; resume with ckpt_path=last and the same overrides")
        raise SystemExit(143 if isinstance(e, SIGTERMException) else 130) from None
    except BaseException as e:
        record.end("failed", error=f"{type(e).__name__}: {e}".splitlines()[0])
        raise
    record.end(
        "ok",
        epochs=trainer.current_epoch,
        **test,  # test/*, stress/* and (with a validation split) stress_val/*
        **{"val/acc_best": None if val_best is None else float(val_best)},
        checkpoint=str(best.relative_to(run_dir.path)) if best else None,
    )
    # Every tracker gets this run's settings; its final figures (test/*, stress/*, val/acc_best)
    # reached each one as they were logged.
    metrics = record.metrics
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):  # the HParams tab pairs settings with these names
            final = {"hp/test_acc": metrics["test/acc"], "hp/val_acc_best": metrics["val/acc_best"] or 0.0}
            logger.log_hyperparams(flat_hparams(cfg), final)
        else:
            logger.log_hyperparams(flat_hparams(cfg))
        # written after the Trainer closed its loggers: flush and close again, or the next
        # job of a sweep (same process) or the process's exit can beat the writer thread
        logger.finalize("success")
    if trainer.is_global_zero:
        log.info(
            "test/acc %.4f  test/loss %.4f%s%s  (%s)",
            test["test/acc"], test["test/loss"],
            f"  stress/acc {test['stress/acc']:.4f}" if "stress/acc" in test else "",
            f"  stress_val/acc {test['stress_val/acc']:.4f}" if "stress_val/acc" in test else "", best,
        )  # fmt: skip
    return record.metrics
