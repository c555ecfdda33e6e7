"""The LightningModule: any network from config, cross-entropy on logits, torchmetrics metrics.

It takes plain config dicts (model, optimizer, scheduler, metrics) and builds everything itself,
so the hyperparameters it saves are plain containers: a checkpoint rebuilds its own network and
loads with `torch.load(weights_only=True)`, and the module never names a concrete optimizer.
"""

from __future__ import annotations

import inspect
import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import get_class
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from torchmetrics import MaxMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from mnistlab import MnistlabError, as_number, instantiate

if TYPE_CHECKING:
    from mnistlab.distill import Distillation

# What a network reads when its data config says nothing else: MNIST's shape and normalisation.
MNIST_INPUT = {"num_classes": 10, "input_shape": [1, 28, 28], "mean": 0.1307, "std": 0.3081, "digits": True}
DEFAULT_METRICS = {"acc": {"_target_": "torchmetrics.classification.MulticlassAccuracy", "average": "micro"}}


def plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, (DictConfig, ListConfig)) else cfg


def check_outputs(net: nn.Module, input_shape: list[int], num_classes: int) -> None:
    """One dry batch through `net`: it must give `num_classes` logits per image."""
    was_training = net.training
    try:
        with torch.no_grad():
            out = net.eval()(torch.zeros(2, *input_shape))
    except Exception as e:  # noqa: BLE001  (a user's network can fail in any way on the wrong shape)
        raise MnistlabError(
            f"the network fails on a batch of {input_shape} images ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:120]}); make it take [N, {', '.join(map(str, input_shape))}]"
        ) from None
    finally:
        net.train(was_training)
    if not isinstance(out, torch.Tensor) or list(out.shape) != [2, num_classes]:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise MnistlabError(
            f"the network gives {shape} for a batch of 2 images, not [2, {num_classes}] logits; "
            f"make its last layer output data.num_classes={num_classes} values per image"
        )


STEPS = re.compile(r"^total_steps\s*(?:-\s*(\d+))?$")


def build_scheduler(config: Any, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    """A scheduler config built for `optimizer`, scheduler configs nested in it (SequentialLR's
    `schedulers`) included. A constructor argument named `total_steps` gets the run's length in
    steps, and a value written `total_steps` or `total_steps - N` becomes that number."""
    if isinstance(config, list):
        return [build_scheduler(c, optimizer, total_steps) for c in config]
    if isinstance(config, str) and (match := STEPS.match(config.strip())):
        return total_steps - int(match.group(1) or 0)
    if not isinstance(config, dict) or "_target_" not in config:
        return config
    kwargs = {
        k: build_scheduler(v, optimizer, total_steps) for k, v in config.items() if not k.startswith("_")
    }
    cls = get_class(config["_target_"])
    if not (isinstance(cls, type) and issubclass(cls, LRScheduler)):
        return instantiate({"_target_": config["_target_"], **kwargs})
    if "total_steps" in inspect.signature(cls).parameters:
        kwargs.setdefault("total_steps", total_steps)
    kwargs = {k: v for k, v in kwargs.items() if k != "optimizer"}
    return cls(optimizer, **kwargs)


def build_metrics(metrics: dict, num_classes: int) -> MetricCollection:
    """torchmetrics from their configs; classification metrics get the data's `num_classes`."""
    built = {}
    for name, config in metrics.items():
        cls = get_class(config["_target_"])
        extra = {"num_classes": num_classes} if "num_classes" in inspect.signature(cls).parameters else {}
        built[name] = instantiate({**extra, **config})
    return MetricCollection(built, compute_groups=False)


def gives_one_value(metric, num_classes: int) -> bool:
    """Whether a metric computes one number (accuracy, F1) or one per class, tried on 2 images."""
    probe = metric.clone()
    probe.update(torch.eye(num_classes)[:2], torch.arange(2) % num_classes)
    return probe.compute().numel() == 1


class Classifier(L.LightningModule):
    def __init__(
        self,
        model: dict,
        optimizer: dict,
        scheduler: dict | None = None,
        num_classes: int = 10,
        label_smoothing: float = 0.0,
        metrics: dict | None = None,
        data: dict | None = None,
        distillation: Distillation | None = None,
    ):
        super().__init__()
        lr = plain(optimizer).get("lr")
        if not as_number(lr) > 0:
            raise MnistlabError(f"optimizer.lr={lr!r} is not allowed; use a value > 0")
        if not 0 <= as_number(label_smoothing) < 1:
            raise MnistlabError(f"label_smoothing={label_smoothing!r} is not allowed; use a value in [0, 1)")
        metrics = {k: v for k, v in (plain(metrics) or DEFAULT_METRICS).items() if v}
        if "acc" not in metrics:
            raise MnistlabError(
                "metrics has no `acc`, which picks the best checkpoint (val/acc); "
                "keep `default` in the list: metrics=[default,f1_macro]"
            )
        data = {**MNIST_INPUT, "num_classes": num_classes, **(plain(data) or {})}
        self.save_hyperparameters(
            {
                "model": plain(model),
                "optimizer": plain(optimizer),
                "scheduler": plain(scheduler) or None,
                "num_classes": data["num_classes"],
                "label_smoothing": label_smoothing,
                "metrics": metrics,
                "data": data,  # what the network takes: shape, classes and normalisation
            }
        )
        self.net = instantiate(self.hparams.model)
        if not isinstance(self.net, nn.Module):
            raise MnistlabError(
                f"model._target_={self.hparams.model.get('_target_')} made a {type(self.net).__name__}, "
                "not a torch.nn.Module; name a network class or a function returning one"
            )
        check_outputs(self.net, data["input_shape"], data["num_classes"])
        num_classes = data["num_classes"]
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_metrics = build_metrics(metrics, num_classes)
        self.test_metrics = self.val_metrics.clone()
        # One-number metrics are logged from the steps, so callbacks see them at the epoch's end
        # like any logged value; per-class ones are logged by the module once the epoch is over.
        self.scalar_metrics = {n for n, m in self.val_metrics.items() if gives_one_value(m, num_classes)}
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # kept in checkpoints, so a resumed run remembers its best
        self.test_prefix = "test"  # `stress` and `stress_val` when the stressed copies are tested
        self.distillation = distillation  # teachers (distill.py): not a submodule, so never saved

    def forward(self, x):
        return self.net(x)

    def _loss(self, logits, labels, stage: str):
        # Smoothing shapes the training target only: val/test loss stay comparable across recipes.
        smoothing = self.hparams.label_smoothing if stage == "train" else 0.0
        loss = F.cross_entropy(logits, labels, label_smoothing=smoothing)
        # sync_dist: under DDP, the epoch's loss is the mean over all processes (free on one device)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        return loss

    def training_step(self, batch, batch_idx):
        images, labels = batch
        logits = self(images)
        self.train_acc(logits, labels)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        loss = self._loss(logits, labels, "train")
        if self.distillation:  # train/loss stays the labels' loss; the optimised one mixes in the teachers'
            loss, logs = self.distillation.loss(logits, images, labels, loss)
            self.log_dict(logs, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        logits = self(images)
        self._loss(logits, labels, "val")
        self._update(self.val_metrics, logits, labels, "val")
        return logits  # for callbacks' pictures

    def test_step(self, batch, batch_idx):
        images, labels = batch
        logits = self(images)
        self._loss(logits, labels, self.test_prefix)
        self._update(self.test_metrics, logits, labels, self.test_prefix)
        return logits

    def _update(self, metrics: MetricCollection, logits, labels, prefix: str) -> None:
        for name, metric in metrics.items():
            metric.update(logits, labels)
            if name in self.scalar_metrics:
                self.log(f"{prefix}/{name}", metric, on_step=False, on_epoch=True, prog_bar=name == "acc")

    def _log_per_class(self, metrics: MetricCollection, prefix: str) -> None:
        """A per-class metric as `prefix/name/CLASS`, once the epoch's batches are all in."""
        for name, metric in metrics.items():
            if name not in self.scalar_metrics:
                values = metric.compute().flatten()
                self.log_dict({f"{prefix}/{name}/{i}": v for i, v in enumerate(values)})
                metric.reset()

    def on_validation_epoch_end(self):
        self._log_per_class(self.val_metrics, "val")
        if self.trainer.sanity_checking:  # a few batches before training: not a result
            return
        self.val_acc_best(self.val_metrics["acc"].compute())
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True)

    def on_test_epoch_end(self):
        self._log_per_class(self.test_metrics, self.test_prefix)

    def configure_optimizers(self):
        optimizer = instantiate(self.hparams.optimizer)(params=self.parameters())
        if not self.hparams.scheduler:
            return optimizer
        config = dict(self.hparams.scheduler)
        interval = config.pop("interval", "epoch")
        config.pop("_partial_", None)
        # A debugging run of a few steps gets 10, the fewest OneCycleLR can split into phases.
        steps = max(int(self.trainer.estimated_stepping_batches), 10)
        scheduler = build_scheduler(config, optimizer, steps)
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
    except (pickle.UnpicklingError, RuntimeError, KeyError, EOFError, TypeError, ValueError, OSError) as e:
        raise MnistlabError(
            f"{path} is not a mnistlab checkpoint that loads with weights_only=True "
            f"({type(e).__name__}); pass a .ckpt written by train.py"
        ) from None
