"""The LightningModule: a network from config, cross-entropy on logits, torchmetrics accuracy.

It takes plain config dicts (model, optimizer, scheduler) and builds everything itself, so
the hyperparameters it saves are plain containers: a checkpoint rebuilds its own network and
loads with `torch.load(weights_only=True)`, and the module never names a concrete optimizer.
"""

from __future__ import annotations

import inspect
import pickle
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchmetrics import MaxMetric
from torchmetrics.classification import MulticlassAccuracy

from mnistlab import MnistlabError, as_number, instantiate

if TYPE_CHECKING:
    from mnistlab.distill import Distillation


def plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


class Classifier(L.LightningModule):
    def __init__(
        self,
        model: dict,
        optimizer: dict,
        scheduler: dict | None = None,
        num_classes: int = 10,
        label_smoothing: float = 0.0,
        distillation: Distillation | None = None,
    ):
        super().__init__()
        lr = plain(optimizer).get("lr")
        if not as_number(lr) > 0:
            raise MnistlabError(f"optimizer.lr={lr!r} is not allowed; use a value > 0")
        if not 0 <= as_number(label_smoothing) < 1:
            raise MnistlabError(f"label_smoothing={label_smoothing!r} is not allowed; use a value in [0, 1)")
        model = {k: v for k, v in plain(model).items() if k != "compile"}  # a key of checkpoints before 0.2
        self.save_hyperparameters(
            {
                "model": model,
                "optimizer": plain(optimizer),
                "scheduler": plain(scheduler) or None,
                "num_classes": num_classes,
                "label_smoothing": label_smoothing,
            }
        )
        self.net = instantiate(self.hparams.model)
        last = self.net[-1]  # build_net has already passed a batch through every layer
        if not isinstance(last, nn.Linear) or last.out_features != num_classes:
            raise MnistlabError(
                f"the network ends in {last}, not {num_classes} logits; end model.layers with gap or "
                f"flatten and a `linear IN {num_classes}`"
            )
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # kept in checkpoints, so a resumed run remembers its best
        self.distillation = distillation  # teachers (distill.py): not a submodule, so never saved

    def forward(self, x):
        return self.net(x)

    def _step(self, batch, stage: str, accuracy: MulticlassAccuracy):
        images, labels = batch
        logits = self(images)
        # Smoothing shapes the training target only: val/test loss stay comparable across recipes.
        smoothing = self.hparams.label_smoothing if stage == "train" else 0.0
        loss = F.cross_entropy(logits, labels, label_smoothing=smoothing)
        accuracy(logits, labels)
        # sync_dist: under DDP, the epoch's loss is the mean over all processes (free on one device)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log(f"{stage}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=True)
        return loss, logits

    def training_step(self, batch, batch_idx):
        loss, logits = self._step(batch, "train", self.train_acc)
        if self.distillation:  # train/loss stays the labels' loss; the optimised one mixes in the teachers'
            loss, logs = self.distillation.loss(logits, *batch, loss)
            self.log_dict(logs, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        return self._step(batch, "val", self.val_acc)[1]  # the logits, for callbacks' pictures

    def test_step(self, batch, batch_idx):
        return self._step(batch, "test", self.test_acc)[1]

    def on_validation_epoch_end(self):
        if self.trainer.sanity_checking:  # a few batches before training: not a result
            return
        self.val_acc_best(self.val_acc.compute())
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True)

    def configure_optimizers(self):
        optimizer = instantiate(self.hparams.optimizer)(params=self.parameters())
        if not self.hparams.scheduler:
            return optimizer
        config = dict(self.hparams.scheduler)
        interval = config.pop("interval", "epoch")
        make_scheduler = instantiate(config)
        # Schedules laid out over the whole run (OneCycleLR) are told its length in steps. A
        # debugging run of a few steps gets 10, the fewest OneCycleLR can split into phases.
        if "total_steps" in inspect.signature(make_scheduler.func).parameters:
            steps = max(int(self.trainer.estimated_stepping_batches), 10)
            make_scheduler = partial(make_scheduler, total_steps=steps)
        scheduler = make_scheduler(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": interval, "name": "lr"},
        }


def load_classifier(path: str | Path) -> Classifier:
    """A trained Classifier from a checkpoint, loaded without unpickling anything but tensors."""
    path = Path(path)
    if not path.is_file():
        raise MnistlabError(
            f"checkpoint {path} does not exist; pass ckpt_path=logs/runs/<run>/checkpoints/last.ckpt"
        )
    try:
        return Classifier.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, KeyError, EOFError, TypeError, ValueError) as e:
        raise MnistlabError(
            f"{path} is not a mnistlab checkpoint that loads with weights_only=True "
            f"({type(e).__name__}); pass a .ckpt written by train.py"
        ) from None
