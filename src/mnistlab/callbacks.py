"""The Lightning callbacks a run is configured with (`conf/callbacks/*.yaml`, one file each):
what a run reports while it trains, and what it keeps beyond the weights.

The LightningModule stays loss, metrics and optimizer; everything a run shows (per-epoch lines,
TensorBoard pictures), keeps (random streams for exact resumes) or refuses (divergence)
lives here.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from matplotlib.figure import Figure

from mnistlab import MnistlabError
from mnistlab.data import MEAN, STD

log = logging.getLogger("mnistlab.train")


class EpochSummary(L.Callback):
    """One log line per epoch (console and train.log): the metrics a progress bar would show,
    kept in the run's log, and readable where no live bar is (CI, `nohup`, files)."""

    def on_train_start(self, trainer, module):  # a run resumed mid-epoch starts no epoch
        self.start = time.perf_counter()

    def on_train_epoch_start(self, trainer, module):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, module):
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        shown = ["train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best"]
        metrics = {k: float(trainer.callback_metrics[k]) for k in shown if k in trainer.callback_metrics}
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        log.info(
            "epoch %d/%d  %s  lr %.3g  (%.0f s)", trainer.current_epoch + 1, trainer.max_epochs,
            "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()), lr, time.perf_counter() - self.start,
        )  # fmt: skip


class LastCheckpoint(ModelCheckpoint):
    """`last.ckpt` at every epoch's end, and once more when SIGTERM arrives (what SLURM and other
    schedulers send before they kill), so a stopped or requeued job resumes where it was."""

    def __init__(self, dirpath: str):
        super().__init__(dirpath=dirpath, filename="last", monitor=None, enable_version_counter=False)

    def on_exception(self, trainer, module, exception):
        if isinstance(exception, SIGTERMException):
            trainer.save_checkpoint(Path(self.dirpath) / "last.ckpt")
            log.info("SIGTERM: saved %s; resume with ckpt_path=last", Path(self.dirpath) / "last.ckpt")


class DivergenceCheck(L.Callback):
    """Fails the run when training has diverged, whatever the optimizer: at any epoch's end (the
    first included, so a one-epoch run is checked too) a non-finite training loss, or one above
    `factor` times chance level's (ln of the number of classes: 2.30 for 10)."""

    def __init__(self, factor: float = 2.0):
        self.factor = factor

    def on_train_epoch_end(self, trainer, module):
        loss = trainer.callback_metrics.get("train/loss")
        if loss is None:
            return
        loss = float(loss)
        chance = math.log(getattr(trainer.datamodule, "num_classes", None) or 10)
        if not math.isfinite(loss) or loss > self.factor * chance:
            raise MnistlabError(
                f"training diverged in epoch {trainer.current_epoch} (train/loss = {loss:.4g}, chance "
                f"level is {chance:.2f}); lower optimizer.lr (now {module.hparams.optimizer.get('lr')})"
            )


class EMA(EMAWeightAveraging):
    """Lightning's exponential moving average of the weights: validation, checkpoints and the
    test see the averaged weights. Lightning's callback, kept alive after `fit`, would load a
    checkpoint's raw (not averaged) weights back into the model for `trainer.test`; this one
    restores its state only when fitting, so the test scores the averaged weights it chose."""

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)


class RandomState(L.Callback):
    """Keeps the random streams of augmentation, dropout and shuffling in each checkpoint, so a
    resumed run continues exactly where the saved one was (Lightning restores weights,
    optimizer and loops, not these)."""

    def state_dict(self) -> dict:
        state = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def digit_grid(
    images: torch.Tensor, titles: list[str], columns: int = 8, mean: float = MEAN, std: float = STD
) -> Figure:
    """A figure of normalised [N, 1, H, W] images, each titled: one sheet drawn once (a
    matplotlib axes per image costs more than a test epoch of a small network on a CPU)."""
    rows = max(1, -(-len(images) // columns))
    h, w = images.shape[-2:]
    top, side = 9, 2  # pixels of margin per image: above it for the title, either side of it
    height, width = h + top, w + 2 * side
    sheet = torch.ones(rows * height, columns * width)  # white paper
    pixels = (images[:, 0].float().cpu() * std + mean).clamp(0, 1)
    fig = Figure(figsize=(columns * 1.1, rows * 1.25))  # not pyplot: no GUI backend, no global state
    ax = fig.add_axes((0, 0, 1, 1))
    ax.axis("off")
    for i, (image, title) in enumerate(zip(pixels, titles, strict=False)):
        y, x = (i // columns) * height, (i % columns) * width
        sheet[y + top : y + height, x + side : x + side + w] = image
        ax.text(x + width / 2, y + top - 1.5, title, ha="center", va="bottom", fontsize=8)
    ax.imshow(sheet.numpy(), cmap="gray", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    return fig


def confusion_figure(matrix: torch.Tensor, title: str) -> Figure:
    matrix, n = matrix.cpu(), len(matrix)
    fig = Figure(figsize=(max(5.5, n * 0.5), max(5, n * 0.45)))
    ax = fig.subplots()
    ax.imshow(matrix.float().log1p().numpy(), cmap="Blues")
    for (i, j), count in zip(
        torch.cartesian_prod(torch.arange(n), torch.arange(n)).tolist(), matrix.flatten(), strict=True
    ):
        if count:
            color = "black" if i != j else "white"
            ax.text(j, i, int(count), ha="center", va="center", fontsize=7, color=color)
    ax.set(xlabel="predicted", ylabel="true", title=title, xticks=range(n), yticks=range(n))
    fig.tight_layout()
    return fig


def confusion(predictions: torch.Tensor, labels: torch.Tensor, n: int = 10) -> torch.Tensor:
    """The n x n count matrix, true class by row, predicted by column."""
    return torch.bincount(labels * n + predictions, minlength=n * n).reshape(n, n)


class Pictures(L.Callback):
    """TensorBoard pictures of what the network is fed and where it goes wrong: a grid of
    augmented training images at the first batch, the validation confusion matrix of the
    last epoch, the test confusion matrix and the misclassified test images (`true ->
    predicted`). Gathered from the logits the steps return: no extra pass over the data."""

    def __init__(self, grid_size: int = 32):
        self.grid_size = grid_size

    @staticmethod
    def _loggers(trainer):
        """The loggers that take pictures: TensorBoard, MLflow and W&B, on the main process."""
        if not trainer.is_global_zero:
            return []
        return [
            lg for lg in trainer.loggers if isinstance(lg, (TensorBoardLogger, MLFlowLogger, WandbLogger))
        ]

    def _draw(self, trainer, tag: str, fig) -> None:
        for logger in self._loggers(trainer):
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure(tag, fig, global_step=trainer.global_step, close=False)
            elif isinstance(logger, MLFlowLogger):
                logger.experiment.log_figure(logger.run_id, fig, f"{tag}.png")
            else:
                logger.log_image(key=tag, images=[fig], step=trainer.global_step)

    def _classes(self, module) -> int:
        return module.hparams.get("num_classes", 10)

    def _grid(self, module, images, titles) -> Figure:
        data = module.hparams.get("data") or {}
        return digit_grid(images, titles, mean=data.get("mean", MEAN), std=data.get("std", STD))

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.current_epoch == 0 and batch_idx == 0 and self._loggers(trainer):
            images, labels = batch
            n = min(self.grid_size, len(labels))
            grid = self._grid(module, images[:n], [str(int(y)) for y in labels[:n]])
            self._draw(trainer, "data/augmented_train", grid)

    def on_validation_epoch_start(self, trainer, module):
        n = self._classes(module)
        self.val_confusion = torch.zeros(n, n, dtype=torch.long, device=module.device)

    def on_validation_batch_end(self, trainer, module, logits, batch, batch_idx, dataloader_idx=0):
        self.val_confusion += confusion(logits.argmax(1), batch[1], len(self.val_confusion))  # no sync

    def on_fit_end(self, trainer, module):
        if getattr(self, "val_confusion", None) is not None and self.val_confusion.sum():
            self._draw(trainer, "confusion/val", confusion_figure(self.val_confusion, "validation"))

    def on_test_epoch_start(self, trainer, module):
        n = self._classes(module)
        self.test_confusion = torch.zeros(n, n, dtype=torch.long, device=module.device)
        self.mistakes: list[tuple] = []

    def on_test_batch_end(self, trainer, module, logits, batch, batch_idx, dataloader_idx=0):
        images, labels = batch
        predictions = logits.argmax(1)
        self.test_confusion += confusion(predictions, labels, len(self.test_confusion))
        if sum(len(m[1]) for m in self.mistakes) < self.grid_size:
            wrong = predictions != labels
            if wrong.any():
                self.mistakes.append((images[wrong].cpu(), labels[wrong].cpu(), predictions[wrong].cpu()))

    def on_test_end(self, trainer, module):
        prefix = getattr(module, "test_prefix", "test")  # the official test set, or a stressed copy
        self._draw(trainer, f"confusion/{prefix}", confusion_figure(self.test_confusion, prefix))
        if self.mistakes:
            images, labels, predictions = (torch.cat(t) for t in zip(*self.mistakes, strict=True))
            n = min(self.grid_size, len(labels))
            titles = [f"{int(t)} -> {int(p)}" for t, p in zip(labels[:n], predictions[:n], strict=True)]
            self._draw(trainer, f"{prefix}/misclassified", self._grid(module, images[:n], titles))
