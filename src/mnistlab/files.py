"""Writes that never leave half a file: a reader sees the old file or the new one, never a torn one.

Every file a run or a release writes (data, metrics.json, checkpoints, weights) goes through
here: written to a temporary file in the same folder, flushed to disk, then renamed over the
target. A crash, a kill or a full disk leaves the previous version where it was.
"""

from __future__ import annotations

import errno
import io
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from mnistlab import MnistlabError


def write_json(path: str | Path, data: dict) -> None:
    """`data` as indented JSON with a final newline, written atomically (run records, release info)."""
    write_atomic(path, (json.dumps(data, indent=2) + "\n").encode())


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically (see `replacing`)."""
    with replacing(path) as tmp:
        tmp.write_bytes(data)


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temporary file beside `path` for the block to write (by any means: bytes, a library's
    own writer); once the block ends without error it is flushed to disk and renamed over
    `path`, otherwise removed. A full disk is one clear error, the previous `path` intact."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; these files are for everyone
        os.replace(tmp, path)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise MnistlabError(
                f"no space left on the disk that holds {path.parent} while writing {path.name}; "
                f"free space there (the previous {path.name} is intact)"
            ) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic: `last.ckpt` is replaced only by a whole new one."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, buffer.getvalue())
