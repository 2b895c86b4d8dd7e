"""The anchor: the chain's head as root last checked it, kept where the service user cannot write
(var/lib/appliance-installer/audit-anchor.json, root's own 0755 directory) and copied to the journal.

The service can rewrite any line of its log and re-chain everything after it; it cannot move the
anchor. `appliance audit verify` requires the chain to pass through the anchored line.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from appliance.atomic import atomic_write_json
from appliance.errors import StateError
from appliance.nofollow import read_capped
from appliance.paths import Layout
from appliance.state import installer_dir

JOURNAL_TAG = "appliance-audit"
MAX_ANCHOR_BYTES = 4096


@dataclass(frozen=True)
class Anchor:
    file: str  # the name of the file holding the head when anchored (it may have been rotated since)
    first: str  # the hash of that file's first line: finds the file again under its rotated name
    lines: int  # that file's lines up to and including the head
    offset: int  # that file's bytes up to and including the head
    hash: str  # the head's hash
    time: str  # when root anchored it (UTC, ISO 8601)

    def describe(self) -> str:
        return f"{self.lines} lines of {self.file} (head {self.hash[:12]}, anchored {self.time})"


def read_anchor(layout: Layout) -> Anchor | None:
    """The recorded anchor, or None when root never anchored this chain."""
    path = layout.audit_anchor
    try:
        raw: Any = json.loads(read_capped(path, MAX_ANCHOR_BYTES))
        return Anchor(**raw)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        raise StateError(f"The audit anchor {path} cannot be read as an anchor.",
                         "Only root writes it: treat this as tampering by root, or restore it from backup.") from None


def may_anchor(layout: Layout) -> bool:
    """Whether this process can move the anchor: root, or whoever owns the tree (a test or demo root)."""
    if os.geteuid() == 0:
        return True
    try:
        st = os.lstat(layout.installer_state)
    except FileNotFoundError:
        st = os.lstat(layout.root)
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()


def write_anchor(layout: Layout, anchor: Anchor) -> None:
    """Record `anchor` atomically in root's directory, then (best effort) in the journal."""
    installer_dir(layout)  # root's, and writable by no one else, or an error
    atomic_write_json(layout.audit_anchor, asdict(anchor), 0o644)
    _journal(layout, anchor)


def _journal(layout: Layout, anchor: Anchor) -> None:
    """One journal line per anchor (only for the host's own root: a --root tree has no journal of
    its own). Verify does not read it back: it is the investigator's second copy, `journalctl -t
    appliance-audit _UID=0`, for when the anchor file itself is lost or doubted."""
    if layout.root != Path("/"):
        return
    message = f"audit anchor: file={anchor.file} lines={anchor.lines} offset={anchor.offset} hash={anchor.hash} first={anchor.first}"
    if tool := shutil.which("systemd-cat"):
        argv, data = [tool, "-t", JOURNAL_TAG, "-p", "notice"], (message + "\n").encode()
    elif tool := shutil.which("logger"):
        argv, data = [tool, "-t", JOURNAL_TAG, "--", message], b""
    else:
        return
    try:
        subprocess.run(argv, input=data, timeout=5, check=False, capture_output=True)
    except (OSError, subprocess.SubprocessError):
        pass  # best effort: the anchor file is the record verify uses
