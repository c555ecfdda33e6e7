"""The task behind `eval.py`: the test metrics of a saved checkpoint, on the official test set
and, with `stress=true`, on the stress test set (`stress.py`)."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from mnistlab import instantiate
from mnistlab.module import load_classifier
from mnistlab.runs import RunDir
from mnistlab.train import build_trainer, stress_test


def evaluate(cfg: DictConfig) -> dict:
    model = load_classifier(cfg.ckpt_path)
    trainer = build_trainer(cfg, enable_checkpointing=False)  # eval.yaml has no callbacks or loggers
    (metrics,) = trainer.test(model, datamodule=instantiate(cfg.data), verbose=False)
    if cfg.stress:
        metrics |= stress_test(trainer, model, cfg.data)
        checkpoint = Path(cfg.ckpt_path).resolve()
        run_dir = RunDir(checkpoint.parents[1])  # <run>/checkpoints/<file>
        run = run_dir.read_metrics()
        if run.get("checkpoint") and run_dir.path / run["checkpoint"] == checkpoint:
            # the checkpoint its run was tested on: the run's record gains the stress figures
            stressed = {k: v for k, v in metrics.items() if k.startswith(("stress/", "stress_val/"))}
            run_dir.write_metrics(run | stressed)
    print(json.dumps({"ckpt_path": str(cfg.ckpt_path), **metrics}))
    return metrics
