"""Root-run verbs that change the service's files do it as the service user (appliance/privileges.py).

Run as root against a tree the service user (uid 65534 here) owns, each verb runs in its own
process, since dropping root cannot be undone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import adapters as reg
from appliance.paths import Layout
from tests.bundle_fixtures import REPO

SERVICE = 65534
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="becoming another user needs root")


@pytest.fixture
def service_tree() -> Iterator[Layout]:
    """A root whose var/lib/appliance and var/log/appliance the service user owns, with two adapters."""
    top = Path(tempfile.mkdtemp(prefix="appliance-root-verbs-"))
    try:
        top.chmod(0o755)  # the service user must reach it, as it reaches / on a host
        layout = Layout.at(top)
        for adapter_id, created in (("a1", "2026-01-01"), ("a2", "2026-01-02")):
            staged = reg.staging_dir(layout, adapter_id)
            (staged / "peft").mkdir()
            (staged / "peft/adapter_config.json").write_text("{}")
            (staged / "peft/adapter_model.safetensors").write_bytes(b"x")
            reg.register(layout, adapter_id, staged, {"created_at": created})
        layout.log_dir.mkdir(parents=True)
        for tree in (layout.var, layout.log_dir):
            for d, dirs, files in os.walk(tree):
                for name in (d, *(os.path.join(d, f) for f in dirs + files)):
                    os.chown(name, SERVICE, SERVICE, follow_symlinks=False)
        yield layout
    finally:
        subprocess.run(["rm", "-rf", str(top)], check=True)


def appliance(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance.cli", *argv], capture_output=True, text=True,
                          cwd=REPO, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_root_promotes_and_rolls_back_adapters_as_the_service_user(service_tree: Layout) -> None:
    layout = service_tree
    done = appliance("adapters", "promote", "a2", "--root", str(layout.root))
    assert done.returncode == 0, done.stderr
    active = layout.adapters / "active"
    assert os.readlink(active) == "a2" and os.lstat(active).st_uid == SERVICE
    assert appliance("adapters", "rollback", "--root", str(layout.root)).returncode == 0
    owned_by_root = [p for p in layout.var.rglob("*") if os.lstat(p).st_uid == 0]
    assert owned_by_root == []
    lines = [json.loads(x) for x in layout.audit_log.read_text().splitlines()]
    assert [(r["event"], r["uid"]) for r in lines] == [("adapter_promoted", SERVICE), ("adapter_rolled_back", SERVICE)]


def test_a_service_directory_swapped_for_a_link_is_refused_before_anything_changes(service_tree: Layout) -> None:
    layout = service_tree
    elsewhere = layout.root / "elsewhere"
    layout.var.rename(elsewhere)
    layout.var.symlink_to(elsewhere)
    done = appliance("adapters", "promote", "a1", "--root", str(layout.root))
    assert done.returncode != 0
    assert "is not a directory (a link or a file took its place)" in done.stderr
    assert not (elsewhere / "adapters/active").exists() and not layout.audit_log.exists()
