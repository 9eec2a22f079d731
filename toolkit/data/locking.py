"""Advisory locks on an output folder, so two runs never write the same samples.

A lock is an OS file lock (``flock``) on a small file under ``OUT/.dtk/locks/``: the kernel
drops it when its holder exits, however it exits, so a crashed or killed run never blocks
the folder. The file also says who holds it (pid, host, start time) for the message a
refused run prints. The files are left in place: deleting a lock file while another
process waits on it would let a third process lock a new file beside the old one.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import pathlib
import socket
import sys
from collections.abc import Iterator

from toolkit.errors import DtkError

try:  # POSIX; elsewhere locks are not available and runs are not protected
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class FolderBusyError(DtkError):
    """Another run holds the lock."""


def _holder(path: pathlib.Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "another dtk run"
    return (
        f"another dtk run (pid {info.get('pid')} on {info.get('host', '?')}, "
        f"started {info.get('started', '?')})"
    )


@contextlib.contextmanager
def hold(path: pathlib.Path, what: str, *, wait: bool = False) -> Iterator[None]:
    """Hold the lock file `path` for the duration of the block.

    Taken: refused with a `FolderBusyError` naming the holder, or, with `wait`, waited for.
    `what` names the locked thing in messages.
    """
    with _lock_file(path) as fd:
        if fd is None:  # pragma: no cover
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(path)
            if not wait:
                raise FolderBusyError(
                    f"{what} is in use by {holder}; wait for it to finish, or rerun with "
                    "--wait to start when it does"
                ) from None
            print(f"dtk: waiting for {holder} to finish with {what}", file=sys.stderr)
            fcntl.flock(fd, fcntl.LOCK_EX)
        _write_holder(fd)
        yield


@contextlib.contextmanager
def _lock_file(path: pathlib.Path) -> Iterator[int | None]:
    """A descriptor of the lock file `path` (made if missing) for the block; closing it
    releases any lock taken through it. None where locks are not available."""
    if fcntl is None:  # pragma: no cover
        yield None
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        yield fd
    finally:
        os.close(fd)


def _write_holder(fd: int) -> None:
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": started}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)


@contextlib.contextmanager
def share(path: pathlib.Path) -> Iterator[None]:
    """Hold the lock file `path` shared, with every process that shares it too, for the
    block; `in_use` tells others it is held."""
    with _lock_file(path) as fd:
        if fd is not None:
            # only `in_use`'s probes hold it exclusively, for microseconds: waiting is brief
            fcntl.flock(fd, fcntl.LOCK_SH)
        yield


def in_use(path: pathlib.Path) -> bool:
    """Whether a process holds the lock file `path` now (shared or not)."""
    if fcntl is None:  # pragma: no cover
        return False
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
