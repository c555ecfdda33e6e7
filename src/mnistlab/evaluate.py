"""The task behind `eval.py`: the test metrics of a saved checkpoint, on the official test set
and, with `stress=true`, on the stress test set (`stress.py`)."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from mnistlab import MnistlabError, instantiate
from mnistlab.files import write_json
from mnistlab.module import load_classifier
from mnistlab.train import build_trainer, stress_test


def evaluate(cfg: DictConfig) -> dict:
    model = load_classifier(cfg.ckpt_path)
    if model.hparams.num_classes != cfg.data.num_classes:
        raise MnistlabError(
            f"{cfg.ckpt_path} predicts {model.hparams.num_classes} classes and the data has "
            f"{cfg.data.num_classes}; pass the data= the checkpoint was trained on"
        )
    trainer = build_trainer(cfg, enable_checkpointing=False)  # eval.yaml has no callbacks or loggers
    (metrics,) = trainer.test(model, datamodule=instantiate(cfg.data), verbose=False)
    if cfg.stress:
        metrics |= stress_test(trainer, model, cfg.data)
        checkpoint = Path(cfg.ckpt_path).resolve()
        record = checkpoint.parents[1] / "metrics.json"
        run = json.loads(record.read_text()) if record.is_file() else {}
        if run.get("checkpoint") and record.parent / run["checkpoint"] == checkpoint:
            # the checkpoint its run was tested on: the run's record gains the stress figures
            stressed = {k: v for k, v in metrics.items() if k.startswith(("stress/", "stress_val/"))}
            write_json(record, run | stressed)
    print(json.dumps({"ckpt_path": str(cfg.ckpt_path), **metrics}))
    return metrics
