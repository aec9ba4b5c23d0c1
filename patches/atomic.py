"""Crash-safe file writes: temp file in the same directory, fsync, rename, fsync directory.

A reader (or a process that starts after a crash) sees the old file or the new one, never a
partial one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: Path, tmp_dir: Path | None = None) -> Iterator[BinaryIO]:
    """A handle whose content replaces `path` atomically when the block ends without an
    exception (otherwise nothing changes). `tmp_dir` must be on the same filesystem."""
    path = Path(path)
    directory = tmp_dir or path.parent
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes, tmp_dir: Path | None = None) -> None:
    """Replace `path` with `data` atomically. `tmp_dir` must be on the same filesystem."""
    with atomic_writer(path, tmp_dir) as handle:
        handle.write(data)


def atomic_write_json(path: Path, data: object) -> None:
    """Replace `path` with `data` as indented JSON (results, reports), atomically."""
    import json

    atomic_write_bytes(Path(path), json.dumps(data, indent=2).encode())
