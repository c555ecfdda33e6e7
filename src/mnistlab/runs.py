"""A run directory's record: `metrics.json` and the states a run goes through, the commit its
code came from, what a resume must match, and the CSV and HParams logs that outlive a resume.

States: `running` -> `ok` | `failed` | `interrupted`. Every way a run can end (our errors,
anyone's exceptions, SIGTERM, Ctrl-C) leaves one of the three final states with its reason.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import subprocess
import time
from datetime import UTC, datetime
from functools import cache, partial
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from mnistlab import MnistlabError
from mnistlab.files import write_json


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


class RunRecord(L.Callback):
    """`metrics.json` of one run, rewritten atomically at every change of state and at every
    epoch's end (so a run killed outright still says how far it got and how long it took).
    A resumed run keeps what the record held and adds its own time to `train_seconds`."""

    def __init__(self, run_dir: Path, **fields):
        self.path, self.writes = run_dir / "metrics.json", rank_zero_only.rank == 0  # DDP: rank 0 writes
        earlier = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.earlier_seconds = earlier.get("train_seconds") or 0.0
        self.metrics = {**earlier, **fields, "status": "running", "started": earlier.get("started", _now())}
        self.metrics.pop("error", None)
        self.clock = None
        self.save()

    def save(self) -> None:
        if self.writes:
            write_json(self.path, self.metrics)

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


def resume_checkpoint(ckpt_path: str | None, run_dir: Path, hparams: dict, max_epochs: int) -> str | None:
    """The checkpoint `ckpt_path` names (`last`: this run directory's last.ckpt), checked to hold
    the same network, optimizer, scheduler and loss as `hparams` and to have epochs left to
    run, or None to start afresh."""
    if not ckpt_path:
        return None
    path = run_dir / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
    if not path.is_file():
        raise MnistlabError(
            f"no checkpoint to resume at {path}; pass hydra.run.dir=<the run's directory> with ckpt_path=last"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        saved, epoch = checkpoint["hyper_parameters"], checkpoint["epoch"]
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
    if epoch + 1 >= max_epochs:
        raise MnistlabError(
            f"{path} has already finished its {epoch + 1} epochs; start a new run, or pass "
            f"trainer.max_epochs=N (N > {epoch + 1}) to extend it"
        )
    return str(path)


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
