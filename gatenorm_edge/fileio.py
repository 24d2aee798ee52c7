"""File I/O: atomic outputs (write beside the target, fsync, rename; never a partial file) and mapped reads."""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np


def _umask() -> int:
    """The process umask (reading it requires setting it; restored at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(path: Path, force: bool = True) -> Iterator[BinaryIO]:
    """Yield a binary file that becomes ``path`` only if the block finishes without error."""
    path = Path(path)
    if path.exists() and not force:
        from .errors import GatenormError

        raise GatenormError(f"{path} exists; pass --force to overwrite it")
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.fchmod(fd, 0o666 & ~_umask())
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
    with contextlib.suppress(OSError):
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a UTF-8 text file atomically (JSON reports, Markdown tables)."""
    with atomic_output(Path(path)) as handle:
        handle.write(text.encode("utf-8"))


def map_region(path: Path, offset: int, nbytes: int) -> np.ndarray | None:
    """Bytes [offset, offset + nbytes) of ``path`` as a read-only uint8 array over a memory map.

    No copy: the pages are read straight from the page cache and unmapped when the array is freed.
    None if the file ends before the region does.
    """
    with Path(path).open("rb") as handle:
        if os.fstat(handle.fileno()).st_size < offset + nbytes:
            return None
        if nbytes == 0:
            return np.empty(0, dtype=np.uint8)
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        mapping = mmap.mmap(handle.fileno(), offset + nbytes - start, access=mmap.ACCESS_READ, offset=start)
    return np.frombuffer(mapping, dtype=np.uint8, count=nbytes, offset=offset - start)


def file_sha256(path: Path, chunk: int = 8 << 20) -> str:
    """SHA-256 of a file, hashed from memory-mapped windows of ``chunk`` bytes (no read copies; only one
    window is mapped at a time, so resident memory stays bounded whatever the file size)."""
    digest = hashlib.sha256()
    size = Path(path).stat().st_size
    for start in range(0, size, chunk):
        window = map_region(path, start, min(chunk, size - start))
        if window is None:
            raise OSError(f"{path} shrank while being hashed")
        digest.update(window)
    return digest.hexdigest()
