"""Fetching, verifying, parsing and splitting MNIST, and what each split is served as."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from conftest import ROOT, TINY_TEST, TINY_TRAIN, idx_bytes
from mnistlab import MnistlabError, data
from mnistlab.data import (
    MEAN,
    MNIST_FILES,
    MNIST_MD5,
    MNIST_SOURCES,
    STD,
    TRAIN_IMAGES,
    IDXDataModule,
    ensure_files,
    read_idx,
)


def test_read_idx_returns_the_written_array(tmp_path):
    array = torch.arange(2 * 3 * 4, dtype=torch.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(idx_bytes(array))
    assert torch.equal(read_idx(tmp_path / "a"), array)


def test_read_idx_rejects_truncated_and_foreign_files(tmp_path):
    raw = idx_bytes(torch.zeros(5, 28, 28, dtype=torch.uint8))
    (tmp_path / "short").write_bytes(raw[:-10])
    (tmp_path / "png").write_bytes(b"\x89PNG\r\n\x1a\n" + raw)
    with pytest.raises(MnistlabError, match="truncated"):
        read_idx(tmp_path / "short")
    with pytest.raises(MnistlabError, match="not an unsigned-byte IDX file"):
        read_idx(tmp_path / "png")


@pytest.fixture
def copied_tiny(tiny_mnist, tmp_path):
    """A private copy of the tiny files (tmp_path/data), so a test may damage them."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for name in MNIST_FILES.values():
        (data_dir / name).write_bytes((tiny_mnist.data_dir / name).read_bytes())
    return data_dir, tiny_mnist.checksums


def source_folder(path, files: dict[str, bytes]) -> str:
    """A real file:// source serving `files`, as a download mirror serves them."""
    path.mkdir()
    for name, body in files.items():
        (path / name).write_bytes(body)
    return path.as_uri() + "/"


def test_a_verified_copy_is_used_without_fetching(copied_tiny, tmp_path):
    data_dir, checksums = copied_tiny
    empty = source_folder(tmp_path / "empty", {})  # would fail if asked
    assert ensure_files(data_dir, MNIST_FILES, checksums, [empty]) == data_dir


def test_a_corrupt_file_is_kept_aside_and_a_verified_copy_fetched(copied_tiny, tmp_path, caplog):
    data_dir, checksums = copied_tiny
    good = (data_dir / TRAIN_IMAGES).read_bytes()
    (data_dir / TRAIN_IMAGES).write_bytes(good[: len(good) // 2])  # an interrupted download
    sources = [
        (tmp_path / "offline").as_uri() + "/",  # a mirror that is down
        source_folder(tmp_path / "wrong", {TRAIN_IMAGES: b"garbage"}),
        source_folder(tmp_path / "good", {TRAIN_IMAGES: good}),
    ]
    ensure_files(data_dir, MNIST_FILES, checksums, sources)
    assert (data_dir / TRAIN_IMAGES).read_bytes() == good
    assert (data_dir / f"{TRAIN_IMAGES}.bad").read_bytes() == good[: len(good) // 2], (
        "the user's file is kept"
    )
    assert f"kept as {TRAIN_IMAGES}.bad" in caplog.text
    assert not list(data_dir.glob(".*.part")), "a temporary file was left behind"


def test_when_every_source_fails_the_message_names_them_and_the_folder(copied_tiny, tmp_path):
    data_dir, checksums = copied_tiny
    (data_dir / TRAIN_IMAGES).write_bytes(b"corrupt")
    mirror = source_folder(tmp_path / "mirror", {TRAIN_IMAGES: b"still corrupt"})
    with pytest.raises(MnistlabError) as error:
        ensure_files(data_dir, MNIST_FILES, checksums, [mirror])
    message = str(error.value)
    assert f"{mirror} (checksum mismatch" in message and str(data_dir) in message
    assert "\n" not in message
    assert (data_dir / TRAIN_IMAGES).read_bytes() == b"corrupt", "nothing unverified is written"
    assert not (data_dir / f"{TRAIN_IMAGES}.bad").exists()


def test_an_unwritable_data_dir_is_one_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(MnistlabError, match="set data.data_dir to a writable folder"):
        ensure_files(blocker / "mnist", MNIST_FILES, MNIST_MD5, MNIST_SOURCES)


def snapshot(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("case", ["mismatch", "partial", "wrong_names"])
def test_a_users_files_survive_every_path_unchanged(copied_tiny, case):
    """A dataset without sources: a file failing its checksum, a missing file, files under other
    names: one error line each, and the folder is exactly as the user left it."""
    data_dir, checksums = copied_tiny
    files = dict(MNIST_FILES)
    if case == "mismatch":
        (data_dir / TRAIN_IMAGES).write_bytes((data_dir / TRAIN_IMAGES).read_bytes()[:-1] + b"\x01")
        expected = f"{data_dir / TRAIN_IMAGES} fails its checksum (data.checksums.train_images)"
    elif case == "partial":
        (data_dir / TRAIN_IMAGES).unlink()
        expected = f"{TRAIN_IMAGES} missing in {data_dir}"
    else:
        files["train_images"] = "my-images.idx"
        expected = "my-images.idx missing in"
    before = snapshot(data_dir)
    with pytest.raises(MnistlabError) as error:
        ensure_files(data_dir, files, checksums, sources=[])
    assert str(error.value).startswith(expected) and "\n" not in str(error.value)
    assert snapshot(data_dir) == before


def test_files_without_checksums_are_used_as_they_are(copied_tiny):
    data_dir, _ = copied_tiny
    (data_dir / TRAIN_IMAGES).write_bytes(idx_bytes(torch.full((1200, 28, 28), 7, dtype=torch.uint8)))
    before = snapshot(data_dir)
    dm = IDXDataModule(data_dir=data_dir, train_size=1000, val_size=200)
    dm.prepare_data()
    dm.setup()
    assert snapshot(data_dir) == before and int(dm.train_set.images.float().mean()) == 7


def test_a_dataset_of_other_names_gzipped_files_and_classes_trains_as_configured(tmp_path):
    """A user's own IDX files: any names, gzipped or not, 3 classes, 16x16 images."""
    import gzip

    g = torch.Generator().manual_seed(0)
    arrays = {
        "train_images": torch.randint(0, 255, (300, 16, 16), generator=g, dtype=torch.uint8),
        "train_labels": torch.randint(0, 3, (300,), generator=g, dtype=torch.uint8),
        "test_images": torch.randint(0, 255, (50, 16, 16), generator=g, dtype=torch.uint8),
        "test_labels": torch.randint(0, 3, (50,), generator=g, dtype=torch.uint8),
    }
    files = {role: f"{role}.idx.gz" for role in arrays}
    for role, array in arrays.items():
        (tmp_path / files[role]).write_bytes(gzip.compress(idx_bytes(array)))
    dm = IDXDataModule(data_dir=tmp_path, files=files, num_classes=3, train_size=250, val_size=50)
    dm.prepare_data()
    dm.setup()
    assert dm.input_shape == [1, 16, 16] and len(dm.train_set) == 250 and len(dm.test_set) == 50
    with pytest.raises(
        MnistlabError, match="labels go up to 2 but data.num_classes=2; set data.num_classes=3"
    ):
        bad = IDXDataModule(data_dir=tmp_path, files=files, num_classes=2, train_size=250, val_size=50)
        bad.setup()


def make_datamodule(tiny_mnist, **kwargs) -> IDXDataModule:
    options = dict(
        data_dir=tiny_mnist.data_dir,
        checksums=tiny_mnist.checksums,
        train_size=1000,
        val_size=200,
        batch_size=64,
    )
    dm = IDXDataModule(**{**options, **kwargs})
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_split_is_disjoint_sized_and_fixed_by_split_seed(tiny_mnist):
    a, b = make_datamodule(tiny_mnist), make_datamodule(tiny_mnist)
    other = make_datamodule(tiny_mnist, split_seed=1)
    assert len(a.train_set) == 1000 and len(a.val_set) == 200 and len(a.test_set) == TINY_TEST
    train_rows = {img.numpy().tobytes() for img in a.train_set.images}
    assert not any(img.numpy().tobytes() in train_rows for img in a.val_set.images)
    assert torch.equal(a.val_set.images, b.val_set.images)
    assert not torch.equal(a.val_set.images, other.val_set.images)


def test_split_larger_than_the_training_set_is_refused(tiny_mnist):
    with pytest.raises(MnistlabError, match="data.train_size \\+ data.val_size"):
        make_datamodule(tiny_mnist, train_size=TINY_TRAIN, val_size=1)


def test_unknown_augmentation_lists_the_known_ones(tiny_mnist):
    with pytest.raises(MnistlabError, match="rotate_shift, rotate_zoom, distort, half_distort, none"):
        IDXDataModule(augment="sideways")


class SeenBatches(L.Callback):
    """Keeps the first batch of each stage as the model receives it (after the transfer hook)."""

    def __init__(self):
        self.seen = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.seen.setdefault("train", batch)

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
        if not trainer.sanity_checking:
            self.seen.setdefault("val", batch)

    def on_test_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
        self.seen.setdefault("test", batch)


@pytest.mark.parametrize("augment", ["rotate_shift", "distort", "half_distort"])
def test_val_and_test_images_are_never_augmented_and_train_images_are(tiny_mnist, augment):
    from mnistlab.module import Classifier

    dm = make_datamodule(tiny_mnist, augment=augment)
    model = Classifier(
        {"_target_": "mnistlab.models.build_net", "layers": ["flatten", "linear 784 10"]},
        {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.01},
    )
    seen = SeenBatches()
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=1,
        limit_test_batches=1,
        callbacks=[seen],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm)

    def plain(images):
        return ((images.float() / 255 - MEAN) / STD).unsqueeze(1)

    val_images, _ = seen.seen["val"]
    test_images, _ = seen.seen["test"]
    assert torch.allclose(val_images, plain(dm.val_set.images[:64]))
    assert torch.allclose(test_images, plain(dm.test_set.images[:64]))
    train_images, train_labels = seen.seen["train"]
    assert train_images.shape == (64, 1, 28, 28) and train_labels.shape == (64,)
    # Shuffled and augmented: no served training image equals any stored one exactly.
    stored = plain(dm.train_set.images)
    assert not any((stored == image).all(dim=(1, 2, 3)).any() for image in train_images)


@pytest.mark.integration
def test_real_mnist_is_fetched_or_reused_with_its_known_counts(real_test_digits):
    """The real files: fetched once into data/, then reused; tests/first40 is their first 40."""
    dm = IDXDataModule(data_dir=str(ROOT / "data"), checksums=MNIST_MD5, sources=MNIST_SOURCES)
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (50_000, 10_000, 10_000)
    all_train = torch.cat([dm.train_set.labels, dm.val_set.labels])
    assert torch.bincount(all_train).tolist() == [
        5923,
        6742,
        5958,
        6131,
        5842,
        5421,
        5918,
        6265,
        5851,
        5949,
    ]
    assert torch.equal(dm.test_set.images[:40], real_test_digits[0])
    assert torch.equal(dm.test_set.labels[:40], real_test_digits[1])
    assert torch.bincount(dm.test_set.labels).tolist() == [
        980,
        1135,
        1032,
        1010,
        982,
        892,
        958,
        1028,
        974,
        1009,
    ]


FETCH_SLOWLY = """
import json, sys, time
from pathlib import Path
from mnistlab import data

source, target, checksums = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])

def slow_copy(source_url, names):  # a source slow enough that the two processes overlap
    time.sleep(1.0)
    return {name: (source / name).read_bytes() for name in names}

data.fetch_from = slow_copy
data.ensure_files(target, data.MNIST_FILES, checksums, ["slow copy"])
"""


@pytest.mark.integration
def test_two_processes_fetching_into_one_folder_leave_it_whole(tiny_mnist, tmp_path):
    import json
    import subprocess
    import sys

    args = [sys.executable, "-c", FETCH_SLOWLY, str(tiny_mnist.data_dir), str(tmp_path / "mnist"),
            json.dumps(tiny_mnist.checksums)]  # fmt: skip
    first, second = (
        subprocess.Popen(args, stderr=subprocess.PIPE),
        subprocess.Popen(args, stderr=subprocess.PIPE),
    )
    assert first.wait(timeout=120) == 0 and second.wait(timeout=120) == 0
    for role, digest in tiny_mnist.checksums.items():
        assert data.md5((tmp_path / "mnist" / MNIST_FILES[role]).read_bytes()) == digest
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == sorted(MNIST_FILES.values())


def test_each_epoch_is_a_new_permutation_and_ddp_shares_are_disjoint_and_equal():
    split = data.Split(
        torch.arange(10, dtype=torch.uint8).view(10, 1, 1).expand(10, 28, 28), torch.arange(10)
    )
    batches = data.ShuffledBatches(split, batch_size=4, shuffle=True)
    torch.manual_seed(0)
    first, second = (torch.cat([labels for _, labels in batches]) for _ in range(2))
    assert sorted(first.tolist()) == list(range(10)) and not torch.equal(first, second)
    assert len(batches) == 3 and all(torch.equal(images[:, 0, 0], labels) for images, labels in batches)
    shares = []
    for rank in (0, 1):  # whatever else each process drew, the seed and epoch fix the permutation
        torch.manual_seed(rank)
        shares.append(torch.cat([labels for _, labels in data.ShuffledBatches(split, 2, True, rank, 2, 7)]))
    whole = torch.cat([labels for _, labels in data.ShuffledBatches(split, 4, True, seed=7)])
    assert torch.equal(torch.stack(shares, 1).flatten(), whole[:10])  # one process's order, dealt in two
    assert len(shares[0]) == len(shares[1]) == 5 and not set(shares[0].tolist()) & set(shares[1].tolist())
