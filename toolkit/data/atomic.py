"""Atomic and durable writes: a file is replaced whole or not at all, and made durable
(on disk, name included) before anyone is told it exists."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import pathlib
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import IO


def _file_mode() -> int:
    # mkstemp makes 0600 files; a dataset should get the usual mode (0666 less the umask)
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


def atomic_write(path: pathlib.Path, data: bytes, *, durable: bool = True) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never half;
    on disk before it is renamed into place, unless not `durable` (the caller then makes it
    durable later: `PartWriter` does, a batch of images at once)."""
    with replacing(path, durable=durable) as handle:
        handle.write(data)


@contextlib.contextmanager
def replacing(path: pathlib.Path, *, durable: bool = True) -> Iterator[IO[bytes]]:
    """A temporary file beside `path`, to write; renamed to `path` (after an fsync, if
    `durable`) when the block ends, removed if it fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def make_durable(paths: Sequence[pathlib.Path]) -> None:
    """Put the files `paths`, and their names, on disk before returning.

    On Linux one ``syncfs`` of the filesystem holding them does it for any number of files,
    at the cost of about one fsync (one journal commit instead of one per file); elsewhere
    each file and each folder holding one is fsynced.
    """
    folders = {path.parent for path in paths}
    # a syncfs per filesystem: a class folder could be a mount point
    filesystems = {os.stat(folder).st_dev: folder for folder in folders}
    if all(_syncfs(folder) for folder in filesystems.values()):
        return
    for path in paths:
        fsync_path(path)
    for folder in folders:
        fsync_path(folder)


def _syncfs(folder: pathlib.Path) -> bool:
    """``syncfs`` on `folder`'s filesystem; False where the C library or kernel has none."""
    syncfs = _libc_syncfs()
    if syncfs is None:
        return False
    fd = os.open(folder, os.O_RDONLY)
    try:
        if syncfs(fd) != 0:
            import ctypes

            code = ctypes.get_errno()
            if code == errno.ENOSYS:
                return False
            raise OSError(code, f"syncfs: {os.strerror(code)}", str(folder))
    finally:
        os.close(fd)
    return True


@functools.cache
def _libc_syncfs() -> Callable[[int], int] | None:
    # Python has no os.syncfs; glibc and musl have had one since 2011
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        syncfs = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    syncfs.argtypes, syncfs.restype = [ctypes.c_int], ctypes.c_int
    return syncfs


def fsync_path(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
