"""The task behind `eval.py`: the test metrics of a saved checkpoint, on the official test set,
with `stress=true` also on the stress test set (`stress.py`), and with `tta=true` also with
test-time augmentation (`test/acc_tta`, beside the plain `test/acc`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig

from mnistlab import MnistlabError, instantiate
from mnistlab.augment import tta_views
from mnistlab.data import IDXDataModule, standardize, to_unit
from mnistlab.module import load_classifier
from mnistlab.runs import RunDir
from mnistlab.train import build_trainer, stress_test


@torch.no_grad()
def tta_accuracy(net: torch.nn.Module, datamodule: IDXDataModule, batches: int | float) -> float:
    """Accuracy on the first `batches` test batches (those `trainer.test` ran) when each image's
    softmax is averaged over its TTA views (augment.TTA_VIEWS)."""
    net.eval()
    device = next(net.parameters()).device
    correct = total = 0
    for index, (images, labels) in enumerate(datamodule.test_dataloader()):
        if index >= batches:
            break
        images, labels = to_unit(images.to(device)), labels.to(device)
        views = (standardize(view, datamodule.mean, datamodule.std) for view in tta_views(images))
        probabilities = sum(torch.softmax(net(view), dim=1) for view in views)
        correct += int((probabilities.argmax(1) == labels).sum())
        total += len(labels)
    return correct / total


def evaluate(cfg: DictConfig) -> dict:
    model = load_classifier(cfg.ckpt_path)
    if model.hparams.num_classes != cfg.data.num_classes:
        raise MnistlabError(
            f"{cfg.ckpt_path} predicts {model.hparams.num_classes} classes and the data has "
            f"{cfg.data.num_classes}; pass the data= the checkpoint was trained on"
        )
    checkpoint = Path(cfg.ckpt_path).resolve()
    run_dir = RunDir(checkpoint.parent.parent)  # <run>/checkpoints/<file>
    try:
        run = run_dir.read_metrics()
    except MnistlabError:  # the checkpoint is what is tested; a damaged record beside it is not
        run = {}
    # in its run's precision, so the figures it adds match; eval.yaml has no callbacks or loggers
    trainer = build_trainer(cfg, recorded_precision=run.get("precision"), enable_checkpointing=False)
    datamodule = instantiate(cfg.data)
    (metrics,) = trainer.test(model, datamodule=datamodule, verbose=False)
    if cfg.get("tta"):
        metrics["test/acc_tta"] = tta_accuracy(model.net, datamodule, trainer.num_test_batches[0])
    if cfg.stress:
        metrics |= stress_test(trainer, model, cfg.data)
    if cfg.stress or cfg.get("tta"):
        run = run or run_dir.read_metrics()  # read above; a damaged record is an error only here
        if run.get("checkpoint") and run_dir.path / run["checkpoint"] == checkpoint:
            # the checkpoint its run was tested on: the run's record gains the new figures
            added = {
                k: v for k, v in metrics.items() if k.startswith(("stress/", "stress_val/", "test/acc_tta"))
            }
            run_dir.write_metrics(run | added)
    print(json.dumps({"ckpt_path": str(cfg.ckpt_path), **metrics}))
    return metrics
