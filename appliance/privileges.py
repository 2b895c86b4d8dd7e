"""Root-run verbs that change the service's own files do it as the service user.

The service user owns var/lib/appliance: root writing there by path would follow any link the
service planted, and would leave root-owned files (SQLite -wal/-shm, adapter links, training
output) that the server then cannot open. So a root caller of such a verb becomes the owner of the
directory it is about to work in, before it touches anything there, and does nothing else as root.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from appliance.errors import ApplianceError


def become_owner_of(directory: Path) -> None:
    """When running as root, become the user and group that own `directory` (a real directory,
    not a link); a no-op for any other caller and for a directory root owns (a test tree)."""
    if os.geteuid() != 0:
        return
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        return  # nothing of the service's there yet: the verb itself says what is missing
    if not stat.S_ISDIR(st.st_mode):
        raise ApplianceError(f"{directory} is not a directory (a link or a file took its place); nothing was changed.",
                             "Check who replaced it, restore the directory, and run the command again.")
    if st.st_uid == 0:
        return
    os.setgroups([])
    os.setgid(st.st_gid)
    os.setuid(st.st_uid)
