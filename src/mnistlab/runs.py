"""The run directory and its record: `RunDir` owns the layout (`metrics.json`, the saved config
and overrides in `.hydra/`, checkpoints, the lock); `RunRecord` writes the states a run goes
through; `resume_checkpoint` says what a resume must match.

States: `running` -> `ok` | `failed` | `interrupted`. Every way a run can end (our errors,
anyone's exceptions, SIGTERM, Ctrl-C) leaves one of the three final states with its reason; a
run whose process is gone without one (`kill -9`, a lost node) reads as `lost` (its record
holds the process's pid, start time and host).
"""

from __future__ import annotations

import csv
import json
import os
import platform
import shutil
import socket
import subprocess
import time
from datetime import UTC, datetime
from functools import cache, partial
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from mnistlab import MnistlabError
from mnistlab.files import write_json

HOST = socket.gethostname()


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


def machine(device: torch.device) -> str:
    """What a run's figures were measured on: the GPU's name, or the CPU's model and its cores
    (a timing or a last digit means little without it), and the PyTorch that ran."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        cpuinfo = Path("/proc/cpuinfo")
        lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
        model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)
        name = f"{model or platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    return f"{name}; torch {torch.__version__}"


def process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, /proc/PID/stat field 22): with the pid,
    it names one process, not whichever later one the system gave the same number."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def process_alive(owner: dict) -> bool | None:
    """Whether the process an owner record names (`pid`, `host`, `pid_start`) still runs: None
    when it ran on another machine, which this one cannot see."""
    if owner.get("host") != HOST or not owner.get("pid"):
        return None
    if Path("/proc").is_dir():
        start = process_start(owner["pid"])
        return start is not None and owner.get("pid_start") in (None, start)
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def this_process() -> dict:
    return {"pid": os.getpid(), "pid_start": process_start(os.getpid()), "host": HOST}


class RunDir:
    """One run's directory, and the only code that knows its layout:

    - `metrics.json`: how the run ended, or how far it got (`read_metrics`, `write_metrics`);
    - `.hydra/config.yaml` and `.hydra/overrides.yaml`: what ran (Hydra stages them in
      `.hydra-<pid>/`; `adopt_config` moves them into place once the run is accepted);
    - `checkpoints/`: `last.ckpt` and the best;
    - `.lock`: the pid, start and host of the process using it (`lock`).
    """

    def __init__(self, path: str | Path, staged: str | None = None):
        self.path, self.staged = Path(path), staged
        self.metrics_file = self.path / "metrics.json"
        self.config_file = self.path / ".hydra" / "config.yaml"
        self.overrides_file = self.path / ".hydra" / "overrides.yaml"
        self.checkpoints = self.path / "checkpoints"
        self.last_checkpoint = self.checkpoints / "last.ckpt"
        self.lock_file = self.path / ".lock"

    @classmethod
    def from_hydra(cls) -> RunDir:
        """The running Hydra job's directory, with the subfolder Hydra saved its config in."""
        from hydra.core.hydra_config import HydraConfig

        hydra = HydraConfig.get()
        return cls(hydra.runtime.output_dir, staged=hydra.output_subdir)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def holds_run(self) -> bool:
        return self.metrics_file.is_file()

    def read_metrics(self) -> dict:
        """The run's record ({} before it has one); an unreadable one is a one-line error."""
        if not self.metrics_file.is_file():
            return {}
        try:
            metrics = json.loads(self.metrics_file.read_text())
            if not isinstance(metrics, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            raise MnistlabError(
                f"{self.metrics_file} is unreadable ({type(e).__name__}); repair or delete that run directory"
            ) from None
        return metrics

    def write_metrics(self, metrics: dict) -> None:
        write_json(self.metrics_file, metrics)

    def read_config(self) -> dict:
        return self._read_yaml(self.config_file, {})

    def read_overrides(self) -> list[str]:
        return [str(o) for o in self._read_yaml(self.overrides_file, [])]

    def save_config(self, config: DictConfig, overrides: list[str]) -> None:
        """The config and overrides a run is started with, for runs started outside a Hydra app
        (a search's trials)."""
        self.config_file.parent.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(config, self.config_file)
        OmegaConf.save(OmegaConf.create(list(overrides)), self.overrides_file)

    def _read_yaml(self, path: Path, empty):
        if not path.is_file():
            return empty
        try:
            return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        except (OSError, ValueError, yaml.YAMLError) as e:
            raise MnistlabError(
                f"{path} is unreadable ({type(e).__name__}); repair or delete that run directory"
            ) from None

    def status(self) -> str | None:
        """The recorded status, `lost` for a `running` run whose process is gone."""
        metrics = self.read_metrics()
        status = metrics.get("status")
        if status == "running" and process_alive(metrics) is False:
            return "lost"
        return status

    def adopt_config(self) -> None:
        """Moves the config Hydra staged (in `.hydra-<pid>/`) to `.hydra/`, replacing the one
        there: called once the run is accepted, so a refused run leaves the saved config as it was."""
        staged = self.staged
        if not staged or staged == ".hydra" or not (self.path / staged).is_dir():
            return
        old = self.path / f".hydra-replaced-{os.getpid()}"
        if self.config_file.parent.is_dir():
            os.replace(self.config_file.parent, old)
        os.replace(self.path / staged, self.config_file.parent)
        shutil.rmtree(old, ignore_errors=True)

    def discard_staged(self) -> None:
        """The config Hydra staged for a run that was refused, removed."""
        if self.staged and self.staged != ".hydra":
            shutil.rmtree(self.path / self.staged, ignore_errors=True)

    def lock(self) -> None:
        """Claims the directory for this process, or refuses at once when a live process holds it.
        A lock left by a process that is gone (kill -9) is taken over."""
        self.path.mkdir(parents=True, exist_ok=True)
        mine = json.dumps({**this_process(), "since": _now()}).encode()
        for _ in range(3):
            try:
                fd = os.open(self.lock_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._lock_owner()
                if owner is not None and owner.get("pid") == os.getpid() and owner.get("host") == HOST:
                    return  # this process holds it already (a second task in one process)
                alive = process_alive(owner or {})
                if owner is None or alive is False:  # unreadable (being written) or stale: take over
                    if owner is not None:
                        self.lock_file.unlink(missing_ok=True)
                    else:
                        time.sleep(0.1)
                    continue
                where = f"process {owner.get('pid')} on {owner.get('host')} (since {owner.get('since')})"
                raise MnistlabError(
                    f"{self.path} is in use by {where}; wait for it to end or pass another hydra.run.dir"
                    + ("" if alive else f" (if that process is gone, delete {self.lock_file})")
                ) from None
            with os.fdopen(fd, "wb") as f:
                f.write(mine)
            return
        raise MnistlabError(f"could not lock {self.path}; delete {self.lock_file} if no run uses it")

    def unlock(self) -> None:
        owner = self._lock_owner()
        if owner and owner.get("pid") == os.getpid() and owner.get("host") == HOST:
            self.lock_file.unlink(missing_ok=True)

    def _lock_owner(self) -> dict | None:
        try:
            return json.loads(self.lock_file.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return None


class StoppedBeforeStart(SystemExit):
    """SIGTERM or Ctrl-C before a run was accepted (while its data was fetched or its settings
    checked): nothing was recorded, and the exit status says which signal (143 or 130)."""

    def __init__(self, how: str):
        super().__init__(143 if how == "SIGTERM" else 130)
        self.message = (
            f"stopped by {how} before the run started (nothing was recorded); run the command again"
        )


class RunRecord(L.Callback):
    """`metrics.json` of one run, rewritten atomically at every change of state and at every
    epoch's end (so a run killed outright still says how far it got and how long it took).
    A resumed run keeps what the record held and adds its own time to `train_seconds`."""

    def __init__(self, run_dir: RunDir, **fields):
        self.run_dir, self.writes = run_dir, rank_zero_only.rank == 0  # DDP: rank 0 writes
        earlier = run_dir.read_metrics()
        self.earlier_seconds = earlier.get("train_seconds") or 0.0
        self.metrics = {**earlier, **fields, "status": "running", "started": earlier.get("started", _now())}
        self.metrics |= this_process()  # a `running` record whose process is gone reads as `lost`
        self.metrics.pop("error", None)
        self.clock = None
        self.save()

    def update(self, **fields) -> None:
        self.metrics.update(fields)
        self.save()

    def save(self) -> None:
        if self.writes:
            self.run_dir.write_metrics(self.metrics)

    def on_train_start(self, trainer, module):
        self.clock = time.perf_counter()

    def on_train_epoch_end(self, trainer, module):
        self._tick()
        self.metrics["epochs"] = trainer.current_epoch + 1
        self.save()

    def _tick(self) -> None:
        if self.clock is not None:
            self.metrics["train_seconds"] = round(self.earlier_seconds + time.perf_counter() - self.clock, 1)

    def end(self, status: str, **fields) -> None:
        if status != "ok":  # a failure mid-fit: the clock stops here
            self._tick()
        self.clock = None
        self.metrics.update(status=status, ended=_now(), **fields)
        self.save()

    def on_train_end(self, trainer, module):
        self._tick()
        self.clock = None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def resume_checkpoint(ckpt_path: str | None, run_dir: RunDir, hparams: dict, max_epochs: int) -> str | None:
    """The checkpoint `ckpt_path` names (`last`: this run directory's last.ckpt), checked to hold
    the same network, optimizer, scheduler and loss as `hparams` and to have steps left to
    run, or None to start afresh (refused in a directory that already holds a run)."""
    if not ckpt_path:
        # DDP: rank 0 checks and owns the directory; the other ranks find its record there already
        if rank_zero_only.rank == 0 and run_dir.holds_run():
            raise MnistlabError(
                f"{run_dir.path} already holds a run; pass ckpt_path=last to resume it, "
                "or another hydra.run.dir for a new run"
            )
        return None
    path = run_dir.last_checkpoint if ckpt_path == "last" else Path(ckpt_path)
    if not path.is_file():
        raise MnistlabError(
            f"no checkpoint to resume at {path}; pass hydra.run.dir=<the run's directory> with ckpt_path=last"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        saved = checkpoint["hyper_parameters"]
        epochs_done(checkpoint)
    except Exception as e:  # noqa: BLE001  (any unreadable file: a truncated copy, another format)
        raise MnistlabError(
            f"{path} is not a readable mnistlab checkpoint ({type(e).__name__}); "
            "pass ckpt_path=last or the path of a .ckpt written by train.py"
        ) from None
    saved = {"label_smoothing": 0.0, **saved}  # checkpoints from before the key: trained without it
    saved["model"] = {k: v for k, v in saved["model"].items() if k != "compile"}
    for key in ("model", "optimizer", "scheduler", "label_smoothing"):
        if saved.get(key) != hparams[key]:
            raise MnistlabError(
                f"{path} was trained with a different {key} ({saved.get(key)}); "
                "resume with the same overrides as the run it continues"
            )
    done = epochs_done(checkpoint)
    if done >= max_epochs:
        raise MnistlabError(
            f"{path} has already finished its {done} epochs; start a new run, or pass "
            f"trainer.max_epochs=N (N > {done}) to extend it"
        )
    return str(path)


def epochs_done(checkpoint: dict) -> int:
    """Whole epochs of training a checkpoint holds: its epoch counts only once all its batches
    ran (a checkpoint saved on SIGTERM is mid-epoch: that epoch is still to finish)."""
    batches = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {})
    mid_epoch = batches and not batches.get("is_last_batch", True)
    return checkpoint["epoch"] + (0 if mid_epoch else 1)


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv; this one continues it."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = list(csv.DictReader(file).fieldnames or [])


class ResumableCSVLogger(CSVLogger):
    """`csv/metrics.csv` that keeps the rows of earlier epochs when a run is resumed."""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


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
