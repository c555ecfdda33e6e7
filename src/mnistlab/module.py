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
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torchmetrics import MaxMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from mnistlab import MnistlabError


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
    ):
        super().__init__()
        self.save_hyperparameters(
            {
                "model": plain(model),
                "optimizer": plain(optimizer),
                "scheduler": plain(scheduler) or None,
                "num_classes": num_classes,
                "label_smoothing": label_smoothing,
            }
        )
        self.net = instantiate(self.hparams.model)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # kept in checkpoints, so a resumed run remembers its best
        # Gathered by the steps that already see the predictions, for the pictures callback.
        self.val_confusion = MulticlassConfusionMatrix(num_classes)
        self.test_confusion = MulticlassConfusionMatrix(num_classes)
        self.val_confusion_last = self.test_confusion_last = None
        self.test_mistakes: list[tuple] = []

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
        return self._step(batch, "train", self.train_acc)[0]

    def validation_step(self, batch, batch_idx):
        _, logits = self._step(batch, "val", self.val_acc)
        self.val_confusion.update(logits.argmax(dim=1), batch[1])

    def test_step(self, batch, batch_idx):
        images, labels = batch
        _, logits = self._step(batch, "test", self.test_acc)
        preds = logits.argmax(dim=1)
        self.test_confusion.update(preds, labels)
        if sum(len(m[1]) for m in self.test_mistakes) < 64:
            wrong = preds != labels
            self.test_mistakes.append((images[wrong].cpu(), labels[wrong].cpu(), preds[wrong].cpu()))

    def on_test_epoch_start(self):
        self.test_mistakes = []

    def on_test_epoch_end(self):
        self.test_confusion_last = self.test_confusion.compute()
        self.test_confusion.reset()

    def on_train_epoch_end(self):
        loss = self.trainer.callback_metrics.get("train/loss")
        if loss is not None and not torch.isfinite(loss):
            raise MnistlabError(
                f"training diverged in epoch {self.current_epoch} (train/loss = {float(loss)}); "
                f"lower optimizer.lr (now {self.hparams.optimizer.get('lr')})"
            )

    def on_validation_epoch_end(self):
        confusion = self.val_confusion.compute()
        self.val_confusion.reset()
        if self.trainer.sanity_checking:  # a few batches before training: not a result
            return
        self.val_confusion_last = confusion
        self.val_acc_best(self.val_acc.compute())
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True)

    def on_save_checkpoint(self, checkpoint):
        # The random streams of augmentation, dropout and shuffling, so a resumed run continues
        # exactly where the saved one was (Lightning restores weights, optimizer and loops).
        checkpoint["rng"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint):
        if "rng" in checkpoint:
            torch.set_rng_state(checkpoint["rng"]["torch"])
            if "cuda" in checkpoint["rng"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])

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
    except (pickle.UnpicklingError, RuntimeError, KeyError, EOFError) as e:
        raise MnistlabError(
            f"{path} is not a mnistlab checkpoint that loads with weights_only=True "
            f"({type(e).__name__}); pass a .ckpt written by train.py"
        ) from None
