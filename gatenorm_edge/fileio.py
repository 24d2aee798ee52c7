"""File I/O: atomic outputs (write beside the target, fsync, rename; never a partial file) and mapped reads."""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import shutil
import tempfile
import threading
from concurrent.futures import CancelledError, ThreadPoolExecutor
from collections.abc import Iterator
from glob import escape as glob_escape
from pathlib import Path
from typing import BinaryIO

import numpy as np


def _umask() -> int:
    """The process umask (reading it requires setting it; restored at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


PARTIAL_TAG = "gatenorm-partial"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale(folder: Path, prefix: str) -> list[Path]:
    """Remove what killed runs left in ``folder`` under ``prefix`` + ``PID-``: files or folders.

    Everything temporary is named with its writer's process id, so a leftover whose process is gone
    (SIGKILL, power loss) is known to be stale; a live process's (a concurrent run's) is left alone.
    """
    removed = []
    for candidate in Path(folder).glob(f"{glob_escape(prefix)}*"):
        pid_text = candidate.name[len(prefix):].split("-", 1)[0]
        if pid_text.isdigit() and not _alive(int(pid_text)):
            if candidate.is_dir() and not candidate.is_symlink():
                shutil.rmtree(candidate, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    candidate.unlink()
            removed.append(candidate)
    return removed


def cache_folder(kind: str) -> Path:
    """Where results of ``kind`` are cached: ``$GATENORM_CACHE/KIND`` or ``~/.cache/gatenorm-edge/KIND``."""
    return Path(os.environ.get("GATENORM_CACHE", Path.home() / ".cache" / "gatenorm-edge")) / kind


def proc_bytes(path: str, key: str) -> int | None:
    """The ``KEY:  N kB`` line of a Linux /proc file (``/proc/meminfo``, ``/proc/self/status``) in bytes;
    None where there is no such file or line."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@contextlib.contextmanager
def work_folder(kind: str, parent: Path | None = None) -> Iterator[Path]:
    """A private temporary folder ``gatenorm-KIND-PID-XXXX`` (in ``parent`` or the system's temp folder),
    removed on the way out; folders that killed runs left behind are removed on the way in."""
    parent = Path(parent or tempfile.gettempdir())
    prefix = f"gatenorm-{kind}-"
    remove_stale(parent, prefix)
    with tempfile.TemporaryDirectory(prefix=f"{prefix}{os.getpid()}-", dir=parent) as folder:
        yield Path(folder)


@contextlib.contextmanager
def atomic_output(path: Path, force: bool = True) -> Iterator[BinaryIO]:
    """Yield a binary file that becomes ``path`` only if the block finishes without error.

    The bytes go to a temporary beside ``path`` (named for it and for this process), are fsynced and
    renamed over ``path``: readers and concurrent writers only ever see a whole file. A temporary left
    by a killed writer is removed by the next write to the same path.
    """
    path = Path(path)
    if path.exists() and not force:
        from .errors import GatenormError

        raise GatenormError(f"{path} exists; pass --force to overwrite it")
    folder = path.parent if str(path.parent) else Path(".")
    prefix = f".{path.name}.{PARTIAL_TAG}-"
    remove_stale(folder, prefix)
    fd, tmp_name = tempfile.mkstemp(prefix=f"{prefix}{os.getpid()}-", suffix=".tmp", dir=folder)
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


def file_sha256(path: Path, chunk: int = 8 << 20, stop: threading.Event | None = None) -> str:
    """SHA-256 of a file, hashed from memory-mapped windows of ``chunk`` bytes (no read copies; only one
    window is mapped at a time, so resident memory stays bounded whatever the file size). ``stop``, when
    set, abandons the hash at the next window (``CancelledError``)."""
    digest = hashlib.sha256()
    size = Path(path).stat().st_size
    for start in range(0, size, chunk):
        if stop is not None and stop.is_set():
            raise CancelledError
        window = map_region(path, start, min(chunk, size - start))
        if window is None:
            raise OSError(f"{path} shrank while being hashed")
        digest.update(window)
    return digest.hexdigest()


class BackgroundSha256:
    """A file's SHA-256 computed in a second thread while the caller works (hashlib releases the GIL
    on large buffers, so on two cores it costs no wall time); abandoned if the caller's block fails."""

    def __init__(self, path: Path) -> None:
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256")
        self._future = self._pool.submit(file_sha256, path, stop=self._stop)

    def result(self) -> str:
        return self._future.result()

    def __enter__(self) -> BackgroundSha256:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None:
            self._stop.set()
        self._pool.shutdown(wait=True)
