"""The task behind `eval.py`: the test metrics of a saved checkpoint."""

from __future__ import annotations

import json

from hydra.utils import instantiate
from omegaconf import DictConfig

from mnistlab.module import load_classifier


def evaluate(cfg: DictConfig) -> dict:
    model = load_classifier(cfg.ckpt_path)
    datamodule = instantiate(cfg.data)
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False)
    (metrics,) = trainer.test(model, datamodule=datamodule)
    print(json.dumps({"ckpt_path": str(cfg.ckpt_path), **metrics}))
    return metrics
