"""`make bench`: what our training path costs against a bare PyTorch loop, measured in one process.

(a) floor: a plain loop over pre-normalised tensors, no augmentation, no Lightning;
(b) ours: the Lightning Trainer with IDXDataModule and `rotate_shift` augmentation (experiment=best);
(c) the original project's way: torchvision PIL transforms per image in a DataLoader with workers.
All three train the same network with Adam on the same number of batches of the same size, on
the GPU when there is one (timed with torch.cuda.synchronize around each epoch), else the CPU;
each is timed over several epochs after a warm-up one (median shown), so start-up and compile
costs are excluded. Prints times, images per second, the ratios b/a and c/b, and the training
path's achieved FLOP/s against the machine's own matmul peak, measured in the same run.
"""

from __future__ import annotations

import logging
import platform
import statistics
import time

import hydra
import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from mnistlab import PROJECT_ROOT, instantiate
from mnistlab.cli import launch, one_line_errors
from mnistlab.data import (
    MEAN,
    MNIST_FILES,
    MNIST_MD5,
    MNIST_SOURCES,
    STD,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    IDXDataModule,
    ensure_files,
    read_idx,
    standardize,
    to_unit,
)
from mnistlab.module import Classifier

ROOT_CONF = PROJECT_ROOT / "conf"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRAIN_FLOP_PER_IMAGE = 3 * 2 * 4.76e6  # gap_cnn: 4.76 M multiply-adds forward; backward ~2x forward


def gap_cnn_config() -> dict:
    return OmegaConf.to_container(OmegaConf.load(ROOT_CONF / "model" / "gap_cnn.yaml"))


OPTIMIZER = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 0.025}


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a large square matmul in `dtype` on DEVICE: the attainable peak to compare with."""
    if DEVICE.type == "cuda":
        size *= 4
    elif dtype == torch.bfloat16:
        size //= 2  # CPUs without bf16 units emulate it, about 100x slower than fp32
    a, b = (
        torch.randn(size, size, device=DEVICE, dtype=dtype),
        torch.randn(size, size, device=DEVICE, dtype=dtype),
    )
    a @ b
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def time_raw_loop(
    images: torch.Tensor, labels: torch.Tensor, batch_size: int, batches: int, repeats: int
) -> float:
    """Seconds per epoch of `batches` steps of a bare loop over pre-normalised float tensors."""
    net = instantiate(gap_cnn_config()).to(DEVICE)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.025)
    x = standardize(to_unit(images[: batch_size * batches])).to(DEVICE)
    y = labels[: batch_size * batches].long().to(DEVICE)
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
        sync()
        start = time.perf_counter()
        epoch()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class EpochTimer(L.Callback):
    def __init__(self):
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, module):
        sync()
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, module):
        sync()
        self.times.append(time.perf_counter() - self.start)


def time_lightning(
    data_dir: str, batch_size: int, batches: int, repeats: int, compile: bool, precision: str = "32-true"
) -> float:
    """Seconds per epoch of `batches` steps through our Trainer + DataModule, after one warm-up."""
    timer = EpochTimer()
    module = Classifier(gap_cnn_config(), OPTIMIZER, None)
    if compile:
        module.net.compile()
    datamodule = IDXDataModule(data_dir=data_dir, batch_size=batch_size, augment="rotate_shift", digits=True)
    trainer = L.Trainer(
        max_epochs=1 + repeats, limit_train_batches=batches, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[timer], accelerator=DEVICE.type, devices=1, precision=precision,
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    return statistics.median(timer.times[1:])


def time_pil_pipeline(data_dir: str, batch_size: int, batches: int, repeats: int, workers: int) -> float:
    """Seconds per epoch of `batches` steps with the original per-image PIL transforms in workers."""
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
    net = instantiate(gap_cnn_config()).to(DEVICE)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.025)

    def epoch():
        for xb, yb in loader:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(net(xb.to(DEVICE)), yb.to(DEVICE)).backward()
            optimizer.step()

    return median_epoch(epoch, repeats)  # the warm-up epoch also starts the workers


def bench(cfg) -> dict[str, float]:
    """Time the three paths (and the compiled ones with `compile`); returns seconds per epoch."""
    data_dir, batch_size, batches, repeats = cfg.data_dir, cfg.batch_size, cfg.batches, cfg.repeats
    # each timed path is its own Trainer: their start and stop lines would bury the table
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    ensure_files(data_dir, MNIST_FILES, MNIST_MD5, MNIST_SOURCES)
    torch.manual_seed(0)
    images, labels = read_idx(f"{data_dir}/{TRAIN_IMAGES}"), read_idx(f"{data_dir}/{TRAIN_LABELS}")
    n = batch_size * batches
    where = torch.cuda.get_device_name() if DEVICE.type == "cuda" else platform.processor() or "cpu"
    print(f"{batches} batches of {batch_size} ({n:,} images) on {DEVICE.type} ({where}), "
          f"{torch.get_num_threads()} threads")  # fmt: skip

    b, compiled = "(b) train.py path, rotate_shift", "(b') compiled"
    bf16_eager, bf16 = "(b*) uncompiled, bf16-mixed autocast", "(b'') compiled, bf16-mixed autocast"
    results = {
        "(a) raw loop, no augmentation": time_raw_loop(images, labels, batch_size, batches, repeats),
        b: time_lightning(data_dir, batch_size, batches, repeats, compile=False),
        f"(c) PIL per image, {cfg.workers} workers": time_pil_pipeline(
            data_dir, batch_size, batches, repeats, cfg.workers
        ),
    }
    if cfg.compile:
        results[compiled] = time_lightning(data_dir, batch_size, batches, repeats, True)
        results[bf16_eager] = time_lightning(data_dir, batch_size, batches, repeats, False, "bf16-mixed")
        results[bf16] = time_lightning(data_dir, batch_size, batches, repeats, True, precision="bf16-mixed")
    for name, seconds in results.items():
        print(f"{name:<44} {seconds:7.3f} s  {n / seconds:9.0f} images/s")
    a, b_time, c = list(results.values())[:3]
    print(f"b/a = {b_time / a:.3f}   c/b = {c / b_time:.3f}")
    fp32_peak = matmul_peak(torch.float32)
    fastest = min(results[k] for k in results if "bf16" not in k)
    achieved = TRAIN_FLOP_PER_IMAGE * n / fastest
    print(f"fp32 matmul peak {fp32_peak / 1e9:.0f} GFLOP/s; fastest fp32 training path {achieved / 1e9:.1f} "
          f"GFLOP/s = {achieved / fp32_peak:.1%} of it")  # fmt: skip
    if cfg.compile:
        bf16_peak = matmul_peak(torch.bfloat16)
        pairs = [(b, bf16), (compiled, bf16), (b, bf16_eager)]
        fast, vs_compiled, eager = (results[x] / results[y] for x, y in pairs)
        print(f"bf16 matmul peak {bf16_peak / 1e9:.0f} GFLOP/s; bf16 autocast compiled {fast:.2f}x as fast "
              f"as (b) and {vs_compiled:.2f}x as (b'); uncompiled {eager:.2f}x as (b)")  # fmt: skip
    return results


@hydra.main(version_base="1.3", config_path=str(PROJECT_ROOT / "conf"), config_name="bench")
@one_line_errors
def main(cfg) -> None:
    bench(cfg)


if __name__ == "__main__":
    launch(main)
