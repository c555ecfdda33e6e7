"""Pictures in TensorBoard: what the network is fed, and where it goes wrong.

At the first training batch, a grid of augmented images with their labels; after the last
validation, the validation confusion matrix; after testing, the test confusion matrix and the
misclassified test images titled `true -> predicted`. The confusion matrices and the mistakes
are gathered by the LightningModule's own steps, so no extra pass over the data is made.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure

from mnistlab.data import MEAN, STD


def digit_grid(images: torch.Tensor, titles: list[str], columns: int = 8):
    """A figure of normalised [N, 1, 28, 28] images, each titled."""
    rows = max(1, -(-len(images) // columns))
    fig = Figure(figsize=(columns * 1.1, rows * 1.25))  # not pyplot: no GUI backend, no global state
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles, strict=False):
        ax.imshow((image[0].float().cpu() * STD + MEAN).clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    return fig


def confusion_figure(matrix: torch.Tensor, title: str):
    matrix = matrix.cpu()
    fig = Figure(figsize=(5.5, 5))
    ax = fig.subplots()
    ax.imshow(matrix.float().log1p().numpy(), cmap="Blues")
    for (i, j), count in zip(
        torch.cartesian_prod(torch.arange(10), torch.arange(10)).tolist(), matrix.flatten(), strict=True
    ):
        if count:
            ax.text(
                j, i, int(count), ha="center", va="center", fontsize=7, color="black" if i != j else "white"
            )
    ax.set(xlabel="predicted", ylabel="true", title=title, xticks=range(10), yticks=range(10))
    fig.tight_layout()
    return fig


class Pictures(L.Callback):
    """Draws into every TensorBoard logger of the run, on rank zero only."""

    def __init__(self, grid_size: int = 32):
        self.grid_size = grid_size

    @staticmethod
    def _writers(trainer):
        return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]

    def _draw(self, trainer, tag: str, fig) -> None:
        for writer in self._writers(trainer):
            writer.add_figure(tag, fig, global_step=trainer.global_step, close=False)

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if (
            trainer.current_epoch == 0
            and batch_idx == 0
            and trainer.is_global_zero
            and self._writers(trainer)
        ):
            images, labels = batch
            n = min(self.grid_size, len(labels))
            self._draw(
                trainer, "data/augmented_train", digit_grid(images[:n], [str(int(y)) for y in labels[:n]])
            )

    def on_fit_end(self, trainer, module):
        if trainer.is_global_zero and module.val_confusion_last is not None:
            self._draw(trainer, "confusion/val", confusion_figure(module.val_confusion_last, "validation"))

    def on_test_end(self, trainer, module):
        if not trainer.is_global_zero:
            return
        self._draw(trainer, "confusion/test", confusion_figure(module.test_confusion_last, "test"))
        if module.test_mistakes:
            images, labels, preds = (torch.cat(t) for t in zip(*module.test_mistakes, strict=True))
            n = min(self.grid_size, len(labels))
            titles = [f"{int(t)} -> {int(p)}" for t, p in zip(labels[:n], preds[:n], strict=True)]
            self._draw(trainer, "test/misclassified", digit_grid(images[:n], titles))
