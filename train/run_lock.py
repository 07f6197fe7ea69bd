"""One run per output_dir: ``RUN/.lock``, held by the main process for the whole run."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
from pathlib import Path

from instantstyle.errors import OutputPathError
from instantstyle.safe_paths import open_lock_file
from train.errors import CheckpointError

log = logging.getLogger(__name__)
_HELD: dict[tuple[int, int], str] = {}  # (device, inode) of the locks this process holds → its holder line


class RunLock:
    """Exclusive use of a run folder: ``RUN/.lock``, locked by the main process for the whole run.

    A POSIX record lock (``lockf``), not ``flock``: it belongs to the process that took it and is not
    shared with the data workers it forks, so a main process killed with ``kill -9`` frees the folder at
    once, even while its orphaned workers live on. The file is opened without following symlinks and
    must be a regular file; it names the holder's host and pid for the message a second run gets.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or CheckpointError (one line) naming the run that holds it."""
        # POSIX locks are per process: this process would be granted its own lock again, and closing any
        # descriptor of the file drops it, so a second claim from within is refused before opening the file.
        holder = _HELD.get(_file_key(self.path))
        if holder is None:
            fd = self._open()
            key = _file_key(fd)
            holder = self._lock(fd)
            if holder is None:
                return self._write_holder(fd, key)
            os.close(fd)
        raise CheckpointError(f"output_dir {self.path.parent} is in use by a run on {holder}; wait for it "
                              "to finish, or give this run another output_dir")

    def _open(self) -> int:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return open_lock_file(self.path, "run lock")
        except OSError as err:
            raise CheckpointError(f"cannot create {self.path}: {err.strerror or err}; choose another output_dir") \
                from None
        except OutputPathError as err:
            raise CheckpointError(f"{err}; the run folder's lock must be a plain file") from None

    def _lock(self, fd: int) -> str | None:
        """None once locked; else the holder's line."""
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EACCES, errno.EAGAIN):
                return os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            # A file system without POSIX locks: run, but say what is unprotected.
            log.warning("cannot lock %s (%s): nothing stops a second run from sharing this output_dir", self.path, err)
        return None

    def _write_holder(self, fd: int, key: tuple[int, int]) -> None:
        line = f"host {socket.gethostname()} pid {os.getpid()}"
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{line}\n".encode(), 0)
        except OSError as err:  # an immutable or full file: the lock still holds, only the name is missing
            log.warning("cannot write the holder into %s (%s)", self.path, err.strerror or err)
        self._fd, _HELD[key] = fd, line

    def release(self) -> None:
        """Drop the lock (closing the file releases it)."""
        if self._fd is not None:
            _HELD.pop(_file_key(self._fd), None)
            os.close(self._fd)
            self._fd = None


def _file_key(where: Path | int) -> tuple[int, int] | None:
    """(device, inode) of a path (not followed) or descriptor; None when the path does not exist."""
    try:
        stat = os.fstat(where) if isinstance(where, int) else os.lstat(where)
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino


def check_run_dir_free(run_dir: str | Path) -> None:
    """CheckpointError when another run holds ``run_dir`` (checked before Hydra writes into it)."""
    lock = RunLock(run_dir)
    if not lock.path.parent.is_dir():
        return
    lock.acquire()
    lock.release()
