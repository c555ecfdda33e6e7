"""Writes that never leave half a file, tested on a real full disk (a small tmpfs)."""

from __future__ import annotations

import subprocess

import pytest
import torch

from mnistlab import MnistlabError
from mnistlab.files import AtomicCheckpointIO


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (mounting one needs root, as CI and these machines are)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_leaves_the_previous_checkpoint_whole_and_says_which_disk(small_disk):
    checkpoints = AtomicCheckpointIO()
    last = small_disk / "last.ckpt"
    checkpoints.save_checkpoint({"weights": torch.zeros(10_000)}, last)  # about 40 KB
    good = last.read_bytes()
    (small_disk / "filler").write_bytes(bytes(256 * 1024 - len(good) - 64 * 1024))  # ~64 KB stay free

    with pytest.raises(
        MnistlabError, match=f"no space left on the disk that holds {small_disk} while writing"
    ):
        checkpoints.save_checkpoint({"weights": torch.ones(40_000)}, last)  # about 160 KB
    assert last.read_bytes() == good  # the checkpoint written before, whole
    assert torch.load(last, weights_only=True)["weights"].shape == (10_000,)
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "last.ckpt"]  # no partial file
