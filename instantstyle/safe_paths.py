"""Where this project writes: regular files and folders only, never through a symlink, a device or /proc.

Every writer (exports, checkpoints, the run lock, caches, shards, generated images and reports)
checks its target here, and writes files through ``write_atomic``: a temporary file created new
(``O_EXCL | O_NOFOLLOW``) beside the target, then renamed over it. A rename replaces whatever the
name points at, so only a regular file, or a new name, may be replaced: ``--out /dev/null`` must not
turn a device into a file, and a symlink planted in a run folder must not redirect a write.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import OutputPathError

SYSTEM_ROOTS = ("/proc", "/sys", "/dev")  # kernel interfaces and devices: never a place for outputs


def _under_system_root(path: Path) -> str | None:
    """The system root ``path`` lies under (after resolving symlinks), or None."""
    real = os.path.realpath(path)
    return next((root for root in SYSTEM_ROOTS if real == root or real.startswith(root + "/")), None)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symlink"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a named pipe"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def check_output_file(path: str | os.PathLike, what: str = "output") -> Path:
    """``path`` may be written: a new name or a regular file, in a folder that exists, outside /proc, /sys, /dev."""
    if not str(path).strip():
        raise OutputPathError(f"the {what} path is empty; give a file name")
    path = Path(path)
    root = _under_system_root(path)
    if root is not None:
        raise OutputPathError(f"{what} {path} lies under {root}; write to a regular file elsewhere")
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as err:
        raise OutputPathError(f"cannot write {what} {path}: {err.strerror}") from None
    if mode is not None and not stat.S_ISREG(mode):
        raise OutputPathError(f"{what} {path} is {_kind(mode)}; only a regular file or a new name is replaced")
    if not path.parent.is_dir():
        raise OutputPathError(f"the folder of {what} {path} does not exist; create it first")
    return path


def check_output_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """``path`` is a folder, or can be made as one, outside /proc, /sys and /dev, and is writable.

    Messages name the folder as ``what`` (e.g. ``output_dir=runs/a``) when it holds the path already.
    """
    name = what if str(path) in what else f"{what} {path}"
    if not str(path).strip():
        raise OutputPathError(f"{name} is empty; give a folder, e.g. runs/first")
    path = Path(path).expanduser()
    root = _under_system_root(path)
    if root is not None:
        raise OutputPathError(f"{name} lies under {root}; choose a folder elsewhere")
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{name} is a file, not a folder; choose another")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputPathError(f"{name}: {existing} is a file, so no folder can be made under it; choose another")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputPathError(f"{name}: {existing} is not writable by this user; choose another")
    return path


def make_output_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """``check_output_dir``, then create it (and its parents); one line when that fails."""
    path = check_output_dir(path, what)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputPathError(f"cannot create {what} {path}: {err.strerror or err}") from None
    return path


def write_atomic(path: str | os.PathLike, data: bytes | str, what: str = "output", mode: int = 0o666) -> Path:
    """Write ``data`` to ``path`` through a new temporary file and a rename; readers see the old or new file.

    The file gets ``mode & ~umask``; a full disk or a read-only folder is one ``OutputPathError`` line and
    leaves neither a temporary file nor a changed target.
    """
    path = check_output_file(path, what)
    blob = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.tmp")  # one fixed name: a killed writer's leftover is replaced next time
    try:
        if os.path.lexists(tmp):
            os.unlink(tmp)  # removes a planted symlink itself, never its target
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), mode)
        try:
            view = memoryview(blob)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as err:
        raise OutputPathError(f"cannot write {what} {path}: {err.strerror or err}") from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    return path


def open_lock_file(path: str | os.PathLike, what: str = "lock file") -> int:
    """A read-write descriptor of the regular file ``path`` (created if new), never following a symlink."""
    path = Path(path)
    check_output_file(path, what)
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as err:
        raise OutputPathError(f"cannot open {what} {path}: {err.strerror or err}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped between the check and the open
        os.close(fd)
        raise OutputPathError(f"{what} {path} is not a regular file; remove it")
    return fd


def save_image(image, path: str | os.PathLike, what: str = "image") -> Path:
    """Save a PIL image through ``write_atomic`` (format from the suffix): never over a device or a symlink."""
    import io

    from PIL import Image

    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise OutputPathError(f"{what} {path}: unknown image suffix {path.suffix!r}; use .png, .jpg or .webp")
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return write_atomic(path, buffer.getvalue(), what)
