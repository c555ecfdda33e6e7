"""How the entry scripts start and end: config registration, a quiet console, one-line errors,
and an exit status that tells the truth about every job of a sweep."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from mnistlab import PROJECT_ROOT, MnistlabError, lightning_trainer_defaults
from mnistlab.runs import RunDir, StoppedBeforeStart

log = logging.getLogger("mnistlab")

# Messages that tell a user nothing about their run, each silenced by its exact text.
NOISE_LOGS = {
    # Lightning's advertisements for its cloud products, printed by every Trainer.
    "lightning.pytorch.utilities.rank_zero": (
        "💡 Tip: For seamless cloud logging and experiment tracking",
        "💡 Tip: For seamless cloud uploads and versioning",
        # Said whenever a schedule asks for the run's length (OneCycleLR); nothing is slow here.
        "Loading `train_dataloader` to estimate number of stepping batches.",
    ),
    # torch.compile looks for CUDA headers on every CPU-only machine that has /usr/local.
    "torch.utils.cpp_extension": ("No CUDA runtime is found, using CUDA_HOME=",),
}
NOISE_WARNINGS = (
    # Lightning 2.6 calls an API that torch 2.10+ deprecated; nothing of ours to change.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # On machines with SLURM's client, a hint to wrap every local run in `srun`; SLURM runs here
    # go through the submitit launcher, which does (see README, "Many processes and machines").
    r"The `srun` command is available on your system but is not used",
)


class _DropMessages(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


@functools.cache
def register() -> None:
    """What the configs need before Hydra composes them; called by each entry script and the tests.

    - `${pid:}` names run directories, so two runs started in the same second never share one;
    - `${project_root:}` roots data/, logs/ and weights/ at the checkout (conf/paths/default.yaml);
    - `lightning_trainer` holds every Trainer argument at Lightning's default, so any
      `trainer.NAME=VALUE` override works as Lightning documents it (conf/trainer/default.yaml);
    - the console without the libraries' noise (`quiet_console`).
    """
    OmegaConf.register_new_resolver("pid", os.getpid, replace=True)
    OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT), replace=True)
    ConfigStore.instance().store(name="lightning_trainer", node=lightning_trainer_defaults())
    quiet_console()


@functools.cache
def quiet_console() -> None:
    """Silence NOISE_LOGS and NOISE_WARNINGS: for the Hydra apps (via `register`) and `make bench`."""
    for logger, starts in NOISE_LOGS.items():
        logging.getLogger(logger).addFilter(_DropMessages(starts))
    for message in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


FAILED_JOBS: dict[str, str] = {}  # job number (its subdir) -> "(overrides): why", for the last line


def one_line_errors(task):
    """Print a `MnistlabError` as `error: ...` and exit 2 instead of showing a traceback.

    In a multirun a failed job is logged and remembered (its metrics.json says why), so the
    other jobs still run; `launch` then exits non-zero naming it."""

    @functools.wraps(task)
    def wrapper(cfg):
        multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
        try:
            try:
                return task(cfg)
            except StoppedBeforeStart as e:  # stops a sweep too: the signal was meant for all of it
                remove_if_rejected()
                print(f"error: {e.message}", file=sys.stderr)
                raise
            except MissingMandatoryValue as e:
                raise MnistlabError(
                    f"{e.full_key} is required: add {e.full_key}=VALUE to the command"
                ) from None
        except MnistlabError as e:
            remove_if_rejected()
            if not multirun:
                print(f"error: {e}", file=sys.stderr)
                sys.exit(2)
            log.error("job failed: %s", e)
            reason = str(e)
        except Exception as e:  # a bug or a library's error: one job's failure, not the sweep's
            if not multirun:
                raise
            log.exception("job failed")
            reason = f"{type(e).__name__}: {e}".splitlines()[0]
        job = HydraConfig.get().job
        FAILED_JOBS[str(job.num)] = f"({job.override_dirname or 'no overrides'}): {reason}"
        return None

    return wrapper


class FailedJobRecords(Callback):
    """At a multirun's end, in the launching process: jobs that ran elsewhere (submitit on SLURM)
    and failed are known from their `metrics.json`; they join the local ones `launch` names."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        for record in sorted(Path(config.hydra.sweep.dir).glob("*/metrics.json")):
            run_dir = RunDir(record.parent)
            try:
                run = run_dir.read_metrics()
            except MnistlabError as e:
                FAILED_JOBS.setdefault(record.parent.name, f"(unreadable record): {e}")
                continue
            if run.get("status") == "failed" and record.parent.name not in FAILED_JOBS:
                how = ",".join(run_dir.read_overrides()) or "no overrides"
                FAILED_JOBS[record.parent.name] = f"({how}): {run.get('error')}"


class WritableRunDirectory(Callback):
    """Before Hydra makes the run (or sweep) directory: one that cannot be made (MNISTLAB_ROOT or
    paths.logs on a read-only disk) is a one-line error, not Hydra's traceback."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config.hydra.sweep.dir)

    @staticmethod
    def _check(path: str) -> None:
        try:
            Path(path).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            print(
                f"error: cannot make the run directory {path} ({e.strerror}); set MNISTLAB_ROOT or "
                "paths.logs to a writable folder",
                file=sys.stderr,
            )
            sys.exit(2)


def remove_if_rejected() -> None:
    """A run refused before it started leaves nothing behind: the config Hydra staged for it is
    removed, and so is a directory Hydra made for it alone (holding only that and the log),
    which would clutter logs/ and `make report`."""
    if not HydraConfig.initialized() or HydraConfig.get().output_subdir is None:
        return  # entry points that write no run directory (eval, predict, ...) run in the user's folder
    run_dir = RunDir.from_hydra()
    run_dir.discard_staged()
    made_by_hydra = {".hydra", f"{HydraConfig.get().job.name}.log"}
    if run_dir.path.is_dir() and {p.name for p in run_dir.path.iterdir()} <= made_by_hydra:
        shutil.rmtree(run_dir.path, ignore_errors=True)


def launch(main) -> None:
    """Run a Hydra entry point; a multirun whose jobs failed ends with one line and exit 1."""
    register()
    main()
    if FAILED_JOBS:
        failed = "; ".join(f"job {num} {why}" for num, why in FAILED_JOBS.items())
        print(f"error: {len(FAILED_JOBS)} job(s) failed: {failed}", file=sys.stderr)
        sys.exit(1)
