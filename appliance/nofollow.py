"""Opening paths as root where another user may have swapped a name: no link followed, no FIFO waited on.

Root-run code works beside directories the service user owns (/var/lib/appliance, /var/log/appliance)
and reads files an administrator names. A name there can become a symbolic link, a FIFO or a device
between any check and any use, so the check and the use are one step: open with O_NOFOLLOW (and
O_NONBLOCK), then judge what was opened with fstat, and act on the descriptor, never on the path again.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from appliance.errors import StateError

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
FILE_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class NotRegularFile(OSError):
    """What was opened is a FIFO, a device, a socket or a directory."""


def trusted(st: os.stat_result) -> bool:
    """Only root (or whoever runs this) can change the entries of a directory with this stat."""
    return st.st_uid in (0, os.geteuid()) and not st.st_mode & 0o022


def why(e: OSError) -> str:
    """The reason an open_file failed, as the end of a sentence."""
    if isinstance(e, NotRegularFile):
        return "it is not a regular file (a FIFO, a device or a directory)"
    if e.errno == errno.ELOOP:
        return "it is a symbolic link"
    return e.strerror or str(e)


def open_file(path: str | Path, flags: int = os.O_RDONLY, mode: int = 0o644, dir_fd: int | None = None) -> int:
    """A descriptor for the regular file `path`; a link is refused (ELOOP), a FIFO or device is opened
    without blocking and refused (NotRegularFile)."""
    fd = os.open(path, flags | FILE_FLAGS, mode, dir_fd=dir_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotRegularFile(errno.EINVAL, "not a regular file", str(path))
    return fd


def read_capped(path: str | Path, cap: int) -> bytes:
    """At most cap + 1 bytes of the regular file `path` (so the caller can tell it is over the cap)."""
    fd = open_file(path)
    try:
        chunks, left = [], cap + 1
        while left > 0:
            data = os.read(fd, left)
            if not data:
                break
            chunks.append(data)
            left -= len(data)
        return b"".join(chunks)
    finally:
        os.close(fd)


def link_refused(path: Path) -> StateError:
    return StateError(f"{path} is a symbolic link in a directory another user can write, and root does not follow it.",
                      "Move the link aside (keep it for an investigation) and run the command again.")


def open_child(parent_fd: int, parent_st: os.stat_result, name: str, path: Path) -> int:
    """Directory `name` inside `parent_fd`: a link is followed only where only root could have made it."""
    try:
        return os.open(name, DIR_FLAGS | os.O_NOFOLLOW, dir_fd=parent_fd)
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        if not stat.S_ISLNK(os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_mode):
            raise
        if not trusted(parent_st):
            raise link_refused(path) from None
    return os.open(name, DIR_FLAGS, dir_fd=parent_fd)  # e.g. /var/lib -> /srv/lib, made by root


def open_dir(path: Path, create: int | None = None) -> int:
    """A descriptor for directory `path`, walked from / one name at a time (see open_child).

    With `create`, missing directories are made with that mode (less the umask)."""
    path = Path(os.path.abspath(path))
    fd = os.open("/", DIR_FLAGS)
    try:
        for i, name in enumerate(path.parts[1:], start=2):
            here = Path(*path.parts[:i])
            st = os.fstat(fd)
            try:
                child = open_child(fd, st, name, here)
            except FileNotFoundError:
                if create is None:
                    raise
                try:
                    os.mkdir(name, create, dir_fd=fd)
                except FileExistsError:
                    pass
                child = open_child(fd, st, name, here)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd
