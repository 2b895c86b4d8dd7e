"""What an install does to the target tree: done for real, or recorded for --dry-run (an implementation swap).

Root runs this, and the service user owns /var/lib/appliance and /var/log/appliance. So every method
reaches its directory through appliance.nofollow.open_dir (no link followed where another user could
have planted it) and acts on descriptors: a name swapped for a link between a check and an act is
never written, chmodded or chowned through.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.atomic import atomic_symlink, atomic_write_bytes
from appliance.errors import StateError
from appliance.nofollow import link_refused, open_child, open_dir


@contextlib.contextmanager
def _parent(path: Path, create: bool = False) -> Iterator[int]:
    fd = open_dir(path.parent, create=0o755 if create else None)
    try:
        yield fd
    finally:
        os.close(fd)


def _lstat(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _chown_walk(top: str, parent_fd: int, uid: int, gid: int) -> None:
    """Deepest first, by descriptor; a link is chowned itself (never its target), and never descended."""
    for _, dirs, files, dir_fd in os.fwalk(top, dir_fd=parent_fd, topdown=False, follow_symlinks=False):
        for name in files + dirs:
            os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
        os.fchown(dir_fd, uid, gid)


class Target:
    """Every change to the target tree goes through one of these methods."""

    dry_run = False

    def mkdir(self, path: Path, mode: int = 0o755, owner: tuple[int, int] | None = None) -> None:
        """Make `path` (and its parents) if missing; set its mode, and its owner when given, on the directory itself."""
        with _parent(path, create=True) as parent:
            made = _lstat(path.name, parent) is None
            if made:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(path.name, 0o700, dir_fd=parent)
            fd = open_child(parent, os.fstat(parent), path.name, path)
            try:
                if owner is not None:
                    os.fchown(fd, *owner)
                os.fchmod(fd, mode)  # after the chown, which may clear setgid
            finally:
                os.close(fd)
            if made:
                os.fsync(parent)

    def write(self, path: Path, data: bytes, mode: int = 0o644) -> None:
        atomic_write_bytes(path, data, mode)

    def symlink(self, target: str, link: Path) -> None:
        atomic_symlink(target, link)

    def rename(self, src: Path, dst: Path) -> None:
        with _parent(src) as s, _parent(dst) as d:
            os.replace(src.name, dst.name, src_dir_fd=s, dst_dir_fd=d)
            os.fsync(d)

    def remove_tree(self, path: Path) -> None:
        """Remove a file, a link (never what it points at) or a whole directory."""
        try:
            parent = open_dir(path.parent)
        except FileNotFoundError:
            return
        try:
            st = _lstat(path.name, parent)
            if st is None:
                return
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(path.name, dir_fd=parent)  # by descriptor; refuses a directory swapped for a link
            else:
                os.unlink(path.name, dir_fd=parent)
            os.fsync(parent)
        finally:
            os.close(parent)

    def chown_tree(self, path: Path, uid: int, gid: int) -> bool:
        """Give a tree that root made and still owns to uid:gid; False (nothing done) when it is not root's.

        Only root's own trees: root never chowns recursively where another user writes. A tree root
        made with mode 0700 (a decrypted model) has nothing in it that the service could have planted.
        """
        with _parent(path) as parent:
            st = _lstat(path.name, parent)
            if st is None or st.st_uid != os.geteuid():
                return False
            if stat.S_ISLNK(st.st_mode):
                raise link_refused(path)
            if not stat.S_ISDIR(st.st_mode):
                os.chown(path.name, uid, gid, dir_fd=parent, follow_symlinks=False)
                return True
            _chown_walk(path.name, parent, uid, gid)
        return True

    @contextlib.contextmanager
    def private_dir(self, path: Path) -> Iterator[int]:
        """A fresh directory only root can enter (0700), as a descriptor: what is written there through it
        is out of the service user's reach even though the directory holding it is the service's."""
        with _parent(path) as parent:
            try:
                os.mkdir(path.name, 0o700, dir_fd=parent)
            except FileExistsError:
                raise StateError(f"{path} appeared while the installer was about to make it; nothing was written there.",
                                 "Something under that directory is interfering with the install: find it, then run the command again.") from None
            fd = open_child(parent, os.fstat(parent), path.name, path)
            try:
                st = os.fstat(fd)
                if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077:
                    raise StateError(f"{path} was replaced while the installer was making it; nothing was written there.",
                                     "Something under that directory is interfering with the install: find it, then run the command again.")
                yield fd
                os.fsync(fd)
            finally:
                os.close(fd)

    def call(self, description: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A bigger change (decrypting a file, building a venv) done by `fn`."""
        return fn(*args, **kwargs)


@dataclass
class RecordingTarget(Target):
    """Writes nothing; remembers what it would have done, in order."""

    actions: list[str] = field(default_factory=list)
    dry_run = True

    def mkdir(self, path: Path, mode: int = 0o755, owner: tuple[int, int] | None = None) -> None:
        self.actions.append(f"mkdir -m {mode:o} {path}" + (f" (owner {owner[0]}:{owner[1]})" if owner else ""))

    def write(self, path: Path, data: bytes, mode: int = 0o644) -> None:
        self.actions.append(f"write {path} ({len(data)} bytes, mode {mode:o})")

    def symlink(self, target: str, link: Path) -> None:
        self.actions.append(f"symlink {link} -> {target}")

    def rename(self, src: Path, dst: Path) -> None:
        self.actions.append(f"rename {src} -> {dst}")

    def remove_tree(self, path: Path) -> None:
        if path.exists() or path.is_symlink():
            self.actions.append(f"remove {path}")

    def chown_tree(self, path: Path, uid: int, gid: int) -> bool:
        self.actions.append(f"chown -R {uid}:{gid} {path} (if root's)")
        return True

    @contextlib.contextmanager
    def private_dir(self, path: Path) -> Iterator[int]:
        raise NotImplementedError("a dry run writes nothing")
        yield 0  # pragma: no cover

    def call(self, description: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.actions.append(description)
        return None
