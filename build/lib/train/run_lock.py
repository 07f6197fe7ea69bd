"""One run per output_dir: ``RUN/.lock``, held by the main process for the whole run."""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from pathlib import Path

from train.checkpoint import CheckpointError

log = logging.getLogger(__name__)


class RunLock:
    """Exclusive use of a run folder: ``RUN/.lock``, flock'ed by the main process for the whole run.

    The kernel drops an flock when its holder dies, so a killed run never leaves the folder locked;
    the file names the holder's host and pid for the message a second run gets.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self._file = None

    def acquire(self) -> None:
        """Take the lock, or CheckpointError (one line) naming the run that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # not "w": truncating before we hold the lock would erase the holder's name
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise CheckpointError(f"output_dir {self.path.parent} is in use by a run on {holder}; wait for it "
                                  "to finish, or give this run another output_dir") from None
        except OSError as err:  # a file system without flock: run, but say what is unprotected
            log.warning("cannot lock %s (%s): nothing stops a second run from sharing this output_dir", self.path, err)
        handle.seek(0)
        handle.truncate()
        handle.write(f"host {socket.gethostname()} pid {os.getpid()}\n")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        """Drop the lock (closing the file releases the flock)."""
        if self._file is not None:
            self._file.close()
            self._file = None
