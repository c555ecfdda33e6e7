"""The task behind `eval.py`: the test metrics of a saved checkpoint."""

from __future__ import annotations

import json

from omegaconf import DictConfig

from mnistlab import instantiate
from mnistlab.module import load_classifier
from mnistlab.train import build_trainer


def evaluate(cfg: DictConfig) -> dict:
    model = load_classifier(cfg.ckpt_path)
    datamodule = instantiate(cfg.data)
    trainer = build_trainer(cfg, enable_checkpointing=False)  # eval.yaml has no callbacks or loggers
    (metrics,) = trainer.test(model, datamodule=datamodule, verbose=False)
    print(json.dumps({"ckpt_path": str(cfg.ckpt_path), **metrics}))
    return metrics
