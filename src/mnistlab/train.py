"""The training task behind `train.py`: seed -> data -> model -> trainer -> fit -> test -> metrics.json."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from functools import cache, partial
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from omegaconf import DictConfig, OmegaConf

from mnistlab import MnistlabError
from mnistlab.augment import AUGMENTATIONS
from mnistlab.data import write_atomic
from mnistlab.models import count_params
from mnistlab.module import Classifier, plain
from mnistlab.summary import format_table

log = logging.getLogger(__name__)


class EpochSummary(L.Callback):
    """One log line per epoch (console and train.log): the metrics a progress bar would show,
    kept in the run's log, and readable where no live bar is (CI, `nohup`, files)."""

    def on_train_epoch_start(self, trainer, module):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, module):
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        shown = ["train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best"]
        metrics = {k: float(trainer.callback_metrics[k]) for k in shown if k in trainer.callback_metrics}
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        log.info(
            "epoch %d/%d  %s  lr %.3g  (%.0f s)", trainer.current_epoch + 1, trainer.max_epochs,
            "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()), lr, time.perf_counter() - self.start,
        )  # fmt: skip


class EMA(EMAWeightAveraging):
    """Lightning's exponential moving average of the weights: validation, checkpoints and the
    test see the averaged weights. Lightning's callback, kept alive after `fit`, would load a
    checkpoint's raw (not averaged) weights back into the model for `trainer.test`; this one
    restores its state only when fitting, so the test scores the averaged weights it chose."""

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)


def build_trainer(cfg: DictConfig, callbacks: list[L.Callback] = ()) -> L.Trainer:
    callbacks = [*(instantiate(c) for c in (cfg.get("callbacks") or {}).values()), *callbacks]
    loggers = [instantiate(lg) for lg in (cfg.get("logger") or {}).values()]
    overrides = {"limit_val_batches": 0} if cfg.data.val_size == 0 else {}
    if cfg.trainer.get("enable_progress_bar") is None and not sys.stdout.isatty():
        overrides["enable_progress_bar"] = False  # a live bar only where someone watches it
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **overrides)


# key -> (test, what the allowed values are); checked before any work starts.
CHECKS = {
    "model.dropout": (lambda v: 0 <= v < 1, "a value in [0, 1)"),
    "optimizer.lr": (lambda v: v > 0, "a value > 0"),
    "data.batch_size": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "data.train_size": (lambda v: isinstance(v, int) and 1 <= v <= 60_000, "an integer in [1, 60000]"),
    "data.val_size": (lambda v: isinstance(v, int) and 0 <= v < 60_000, "an integer in [0, 60000)"),
    "trainer.max_epochs": (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"),
    "data.augment": (lambda v: v in AUGMENTATIONS, f"one of {', '.join(AUGMENTATIONS)}"),
}


def check_config(cfg: DictConfig) -> None:
    """Refuse values that would fail (or silently mislead) only after data and model are built."""
    for key, (ok, allowed) in CHECKS.items():
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        try:
            valid = ok(value)
        except TypeError:
            valid = False
        if not valid or isinstance(value, bool):
            raise MnistlabError(f"{key}={value!r} is not allowed; use {allowed}")
    total = cfg.data.train_size + cfg.data.val_size
    if total > 60_000:
        raise MnistlabError(
            f"data.train_size + data.val_size = {total} is more than MNIST's 60000 training images; lower one"
        )


def flat_hparams(cfg: DictConfig) -> dict:
    """The run's hyperparameters as flat `group.key` scalars, for TensorBoard's HParams tab."""
    chosen = {
        "seed": cfg.seed,
        "model": cfg.model,
        "optimizer": cfg.optimizer,
        "scheduler": cfg.scheduler or {"_target_": "none"},
        "label_smoothing": cfg.label_smoothing,
        "data": {k: v for k, v in cfg.data.items() if k not in ("data_dir", "checksums", "_target_")},
        "trainer": {"max_epochs": cfg.trainer.max_epochs, "precision": cfg.trainer.precision},
    }
    flat = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key != "_partial_":
                    walk(f"{prefix}.{key}" if prefix else key, value)
        elif isinstance(node, list):
            flat[prefix] = " | ".join(map(str, node))
        else:
            flat[prefix.replace("._target_", "")] = str(node) if node is None else node

    walk("", OmegaConf.to_container(OmegaConf.create(chosen), resolve=True))
    return flat


@cache  # the code a process runs is what it imported: later jobs of a sweep keep the first answer
def source_commit() -> str | None:
    """The git commit the code ran from, `+dirty` when files differed from it; None outside git."""
    root = Path(__file__).resolve().parent
    try:
        run = partial(subprocess.run, cwd=root, capture_output=True, text=True, check=True, timeout=10)
        commit = run(["git", "rev-parse", "HEAD"]).stdout.strip()
        dirty = run(["git", "status", "--porcelain", "--untracked-files=no"]).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def resume_from(cfg: DictConfig, run_dir: Path) -> str | None:
    """The checkpoint `ckpt_path` names (`last`: this run directory's last.ckpt), checked to hold
    the same network, optimizer, scheduler and loss as the config, or None to start afresh."""
    if not cfg.get("ckpt_path"):
        return None
    path = run_dir / "checkpoints" / "last.ckpt" if cfg.ckpt_path == "last" else Path(cfg.ckpt_path)
    if not path.is_file():
        raise MnistlabError(
            f"no checkpoint to resume at {path}; pass hydra.run.dir=<the run's directory> with ckpt_path=last"
        )
    hparams = torch.load(path, map_location="cpu", weights_only=True)["hyper_parameters"]
    saved = {"label_smoothing": 0.0, **hparams}  # checkpoints from before the key: trained without it
    expected = {
        "model": plain(cfg.model),
        "optimizer": plain(cfg.optimizer),
        "scheduler": plain(cfg.scheduler) or None,
        "label_smoothing": cfg.label_smoothing,
    }
    for key, value in expected.items():
        if saved.get(key) != value:
            raise MnistlabError(
                f"{path} was trained with a different {key} ({saved.get(key)}); "
                "resume with the same overrides as the run it continues"
            )
    return str(path)


def train(cfg: DictConfig, callbacks: list[L.Callback] = ()) -> dict:
    """Fit, test the checkpoint with the best `val/acc` (the last one when there is no
    validation set), and write `metrics.json` in the run directory. Returns the metrics."""
    check_config(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    shown = OmegaConf.to_container(cfg, resolve=True)
    shown["trainer"] = {k: v for k, v in shown["trainer"].items() if v is not None}  # Lightning's defaults
    log.info("run directory: %s\n%s", run_dir, OmegaConf.to_yaml(shown))
    resume_path = resume_from(cfg, run_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # the printed config shows it
    datamodule = instantiate(cfg.data)
    model = Classifier(cfg.model, cfg.optimizer, cfg.scheduler, label_smoothing=cfg.label_smoothing)
    log.info("model:\n%s", format_table(model.net))
    trainer = build_trainer(cfg, callbacks)

    metrics: dict = {
        "status": "running",
        "seed": cfg.seed,
        "params": count_params(model.net),
        "commit": source_commit(),
    }

    def save_metrics():
        if trainer.is_global_zero:  # under DDP every process gets here; one writes
            write_atomic(run_dir / "metrics.json", json.dumps(metrics, indent=2).encode())

    save_metrics()  # a run killed from outside still says what it was
    try:
        start = time.perf_counter()
        trainer.fit(model, datamodule=datamodule, ckpt_path=resume_path)
        metrics["train_seconds"] = round(time.perf_counter() - start, 1)
        metrics["epochs"] = trainer.current_epoch
        val_best = trainer.callback_metrics.get("val/acc_best")
        monitored_first = sorted(trainer.checkpoint_callbacks, key=lambda c: c.monitor is None)
        ckpt_path = next((c.best_model_path for c in monitored_first if c.best_model_path), None)
        (test,) = trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path)
    except MnistlabError as e:
        metrics.update(status="failed", error=str(e))
        save_metrics()
        raise
    metrics.update(
        {
            "status": "ok",
            "test/acc": test["test/acc"],
            "test/loss": test["test/loss"],
            "val/acc_best": None if val_best is None else float(val_best),
            "checkpoint": str(Path(ckpt_path).relative_to(run_dir)) if ckpt_path else None,
        }
    )
    save_metrics()
    for logger in trainer.loggers:  # the HParams tab: this run's settings beside its results
        if isinstance(logger, TensorBoardLogger):
            final = {"hp/test_acc": metrics["test/acc"], "hp/val_acc_best": metrics["val/acc_best"] or 0.0}
            logger.log_hyperparams(flat_hparams(cfg), final)
            # written after the Trainer closed its loggers: flush and close again, or the next
            # job of a sweep (same process) or the process's exit can beat the writer thread
            logger.finalize("success")
    if trainer.is_global_zero:
        log.info("test/acc %.4f  test/loss %.4f  (%s)", metrics["test/acc"], metrics["test/loss"], ckpt_path)
    return metrics
