"""What an install does to the target tree: done for real, or recorded for --dry-run (an implementation swap)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.atomic import atomic_symlink, atomic_write_bytes, fsync_dir


class Target:
    """Every change to the target tree goes through one of these methods."""

    dry_run = False

    def mkdir(self, path: Path, mode: int = 0o755) -> None:
        if not path.is_dir():
            path.mkdir(parents=True, mode=mode, exist_ok=True)
            fsync_dir(path.parent)
        path.chmod(mode)

    def write(self, path: Path, data: bytes, mode: int = 0o644) -> None:
        atomic_write_bytes(path, data, mode)

    def symlink(self, target: str, link: Path) -> None:
        atomic_symlink(target, link)

    def rename(self, src: Path, dst: Path) -> None:
        os.replace(src, dst)
        fsync_dir(dst.parent)

    def remove_tree(self, path: Path) -> None:
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path)
        else:
            return
        fsync_dir(path.parent)

    def chown_tree(self, path: Path, uid: int, gid: int) -> None:
        for d, dirs, files in os.walk(path):
            os.chown(d, uid, gid)
            for name in dirs + files:
                os.chown(os.path.join(d, name), uid, gid, follow_symlinks=False)

    def call(self, description: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A bigger change (decrypting a file, building a venv) done by `fn`."""
        return fn(*args, **kwargs)


@dataclass
class RecordingTarget(Target):
    """Writes nothing; remembers what it would have done, in order."""

    actions: list[str] = field(default_factory=list)
    dry_run = True

    def mkdir(self, path: Path, mode: int = 0o755) -> None:
        self.actions.append(f"mkdir -m {mode:o} {path}")

    def write(self, path: Path, data: bytes, mode: int = 0o644) -> None:
        self.actions.append(f"write {path} ({len(data)} bytes, mode {mode:o})")

    def symlink(self, target: str, link: Path) -> None:
        self.actions.append(f"symlink {link} -> {target}")

    def rename(self, src: Path, dst: Path) -> None:
        self.actions.append(f"rename {src} -> {dst}")

    def remove_tree(self, path: Path) -> None:
        if path.exists() or path.is_symlink():
            self.actions.append(f"remove {path}")

    def chown_tree(self, path: Path, uid: int, gid: int) -> None:
        self.actions.append(f"chown -R {uid}:{gid} {path}")

    def call(self, description: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.actions.append(description)
        return None
