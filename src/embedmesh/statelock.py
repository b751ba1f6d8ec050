"""One running node per state folder: an exclusive ``flock`` on ``<state_dir>/embedmesh.lock``.

Two processes on one state folder would share one node key: the second would take the first
one's control stream over and both would fight over the same WireGuard sessions. The lock file
holds the PID of its owner, so the second process can say which one holds it. ``flock`` locks
belong to the open file, so the kernel releases it when the owner exits, however it exits: a
crashed node never leaves a stale lock behind (the file stays, unlocked).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

from embedmesh.errors import StateDirInUseError
from embedmesh.state import ensure_private_dir

LOCK_NAME = "embedmesh.lock"


def lock_path(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / LOCK_NAME


class StateDirLock:
    """The exclusive lock on a state folder, held from :meth:`acquire` until :meth:`release`."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.state_dir = Path(state_dir)
        self.path = lock_path(state_dir)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise :class:`~embedmesh.errors.StateDirInUseError` naming the holder."""
        if self._fd is not None:
            return
        ensure_private_dir(self.state_dir)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            _lock_exclusive(fd)
        except BlockingIOError:
            os.close(fd)
            pid = holder_pid(self.state_dir)
            who = f"PID {pid}" if pid is not None else "another process"
            raise StateDirInUseError(
                f"{self.state_dir} is in use by a running node ({who}, lock {self.path}): stop it first "
                f"(embedmesh down --state-dir {self.state_dir}) or use another state folder"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            # Closing the file drops the flock; the file stays (removing it would race with a
            # process that opened it and is about to lock it).
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)


def _lock_exclusive(fd: int) -> None:
    # A few quick tries: is_locked() of `embedmesh down`/`status` holds a shared lock for an
    # instant, which must not make a starting node refuse its own folder.
    for _ in range(10):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            time.sleep(0.02)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def holder_pid(state_dir: str | os.PathLike[str]) -> int | None:
    """The PID written in the lock file (None if there is none or it is unreadable)."""
    try:
        text = lock_path(state_dir).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isascii() and text.isdigit() else None


def is_locked(state_dir: str | os.PathLike[str]) -> bool:
    """Whether a running process holds the lock of ``state_dir`` right now."""
    try:
        fd = os.open(lock_path(state_dir), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
