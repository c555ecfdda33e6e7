"""`make bench`: what our training path costs against a bare PyTorch loop, measured in one process.

(a) floor: a plain loop over pre-normalised tensors, no augmentation, no Lightning;
(b) ours: the Lightning Trainer with MNISTDataModule and the default `readme` augmentation;
(c) seed-style: torchvision PIL transforms per image in a DataLoader with workers.
All three train the same network with Adam on the same number of batches of the same size;
each is timed over several epochs after a warm-up one (median shown), so start-up costs are
excluded. Prints times, images per second and the ratios b/a and c/b.
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mnistlab.data import (
    MEAN,
    STD,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    MNISTDataModule,
    read_idx,
    standardize,
    to_unit,
)
from mnistlab.module import Classifier

ROOT_CONF = "conf"


def gap_cnn_config() -> dict:
    return OmegaConf.to_container(OmegaConf.load(f"{ROOT_CONF}/model/gap_cnn.yaml"))


OPTIMIZER = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 0.05}


def time_raw_loop(
    images: torch.Tensor, labels: torch.Tensor, batch_size: int, batches: int, repeats: int
) -> float:
    """Seconds per epoch of `batches` steps of a bare loop over pre-normalised float tensors."""
    net = instantiate(gap_cnn_config())
    optimizer = torch.optim.Adam(net.parameters(), lr=0.05)
    x = standardize(to_unit(images[: batch_size * batches]))
    y = labels[: batch_size * batches].long()
    net.train()

    def epoch():
        for i in range(batches):
            xb, yb = x[i * batch_size : (i + 1) * batch_size], y[i * batch_size : (i + 1) * batch_size]
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(net(xb), yb).backward()
            optimizer.step()

    return median_epoch(epoch, repeats)


def median_epoch(epoch, repeats: int) -> float:
    """Median seconds of `repeats` calls of `epoch` after one warm-up call."""
    epoch()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        epoch()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class EpochTimer(L.Callback):
    def __init__(self):
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, module):
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, module):
        self.times.append(time.perf_counter() - self.start)


def time_lightning(
    data_dir: str, batch_size: int, batches: int, repeats: int, augment: str, compile: bool
) -> float:
    """Seconds per epoch of `batches` steps through our Trainer + DataModule, after one warm-up."""
    timer = EpochTimer()
    model_cfg = {**gap_cnn_config(), "compile": compile}
    module = Classifier(model_cfg, OPTIMIZER, None)
    datamodule = MNISTDataModule(data_dir=data_dir, batch_size=batch_size, augment=augment)
    trainer = L.Trainer(
        max_epochs=1 + repeats, limit_train_batches=batches, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[timer], accelerator="cpu", devices=1,
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    return statistics.median(timer.times[1:])


def time_seed_pipeline(data_dir: str, batch_size: int, batches: int, repeats: int, workers: int) -> float:
    """Seconds per epoch of `batches` steps with the seed's per-image PIL transforms in workers."""
    from PIL import Image
    from torchvision import transforms
    from torchvision.datasets.vision import VisionDataset

    images, labels = read_idx(f"{data_dir}/{TRAIN_IMAGES}"), read_idx(f"{data_dir}/{TRAIN_LABELS}")

    class PilMnist(VisionDataset):
        def __len__(self):
            return batch_size * batches

        def __getitem__(self, i):
            return self.transform(Image.fromarray(images[i].numpy(), mode="L")), int(labels[i])

    transform = transforms.Compose([
        transforms.RandomRotation(10), transforms.RandomAffine(degrees=0, translate=(0.1, 0.1)),
        transforms.ToTensor(), transforms.Normalize((MEAN,), (STD,)),
    ])  # fmt: skip
    loader = torch.utils.data.DataLoader(
        PilMnist(root=None, transform=transform), batch_size=batch_size, shuffle=True,
        num_workers=workers, persistent_workers=workers > 0,
    )  # fmt: skip
    net = instantiate(gap_cnn_config())
    optimizer = torch.optim.Adam(net.parameters(), lr=0.05)

    def epoch():
        for xb, yb in loader:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(net(xb), yb).backward()
            optimizer.step()

    return median_epoch(epoch, repeats)  # the warm-up epoch also starts the workers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per path (median shown)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time (b) with model.compile=true")
    args = parser.parse_args()
    MNISTDataModule(data_dir=args.data_dir).prepare_data()
    torch.manual_seed(0)
    images, labels = read_idx(f"{args.data_dir}/{TRAIN_IMAGES}"), read_idx(f"{args.data_dir}/{TRAIN_LABELS}")
    n = args.batch_size * args.batches
    print(f"{args.batches} batches of {args.batch_size} ({n:,} images), {torch.get_num_threads()} threads")

    results = {
        "(a) raw loop, no augmentation": time_raw_loop(
            images, labels, args.batch_size, args.batches, args.repeats
        ),
        "(b) train.py path, readme augmentation": time_lightning(
            args.data_dir, args.batch_size, args.batches, args.repeats, "readme", compile=False
        ),
        f"(c) seed-style PIL pipeline, {args.workers} workers": time_seed_pipeline(
            args.data_dir, args.batch_size, args.batches, args.repeats, args.workers
        ),
    }
    if args.compile:
        results["(b') train.py path, model.compile=true"] = time_lightning(
            args.data_dir, args.batch_size, args.batches, args.repeats, "readme", compile=True
        )
    for name, seconds in results.items():
        print(f"{name:<44} {seconds:7.2f} s  {n / seconds:8.0f} images/s")
    a, b, c = list(results.values())[:3]
    print(f"b/a = {b / a:.3f}   c/b = {c / b:.3f}")
    if args.compile:
        print(f"b'/b = {results[list(results)[3]] / b:.3f}")


if __name__ == "__main__":
    main()
