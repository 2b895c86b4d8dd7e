"""The on-disk layout of an installed appliance, under any root (`/` in production)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The systemd units the installer writes and everything else names: one definition each.
SERVER_UNIT = "appliance-server.service"
TRAINER_UNIT = "appliance-trainer.service"
TIMER_UNIT = "appliance-trainer.timer"
UNITS = (SERVER_UNIT, TRAINER_UNIT, TIMER_UNIT)

@dataclass(frozen=True)
class Layout:
    root: Path

    @classmethod
    def at(cls, root: str | Path) -> Layout:
        return cls(Path(root).resolve())

    @property
    def opt(self) -> Path:
        return self.root / "opt/appliance"

    @property
    def releases(self) -> Path:
        return self.opt / "releases"

    @property
    def current(self) -> Path:
        return self.opt / "current"

    @property
    def etc(self) -> Path:
        return self.root / "etc/appliance"

    @property
    def config_file(self) -> Path:
        return self.etc / "appliance.toml"

    @property
    def trust_dir(self) -> Path:
        return self.etc / "trust"

    @property
    def var(self) -> Path:
        return self.root / "var/lib/appliance"

    @property
    def models(self) -> Path:
        return self.var / "models"

    @property
    def adapters(self) -> Path:
        return self.var / "adapters"

    @property
    def data(self) -> Path:
        return self.var / "data"

    @property
    def installer_state(self) -> Path:
        """Root's own directory (root:root 0755): what the service user must not be able to change.

        The service owns `var`, so nothing root relies on (rollback protection, the audit chain's
        anchor, the install lock) may live there.
        """
        return self.root / "var/lib/appliance-installer"

    @property
    def audit_anchor(self) -> Path:
        """The audit chain's head as root last checked it (file, line count, hash): see appliance/audit."""
        return self.installer_state / "audit-anchor.json"

    @property
    def state_file(self) -> Path:
        """Installed releases, the highest bundle sequence and the clock floor: root's alone."""
        return self.installer_state / "state.json"

    @property
    def legacy_state_file(self) -> Path:
        """Where releases before the move kept state.json (service-owned): read once, to migrate."""
        return self.var / "state.json"

    @property
    def install_lock(self) -> Path:
        return self.installer_state / "install.lock"

    @property
    def log_dir(self) -> Path:
        return self.root / "var/log/appliance"

    @property
    def audit_log(self) -> Path:
        return self.log_dir / "audit.jsonl"

    @property
    def command_link(self) -> Path:
        """`appliance` on the administrators' PATH: a link to the current release's command."""
        return self.root / "usr/local/bin/appliance"

    @property
    def command(self) -> Path:
        """What the link points at (through `current`, so upgrades and rollbacks never touch it)."""
        return self.current / "venv/bin/appliance"

    @property
    def systemd_units(self) -> Path:
        return self.root / "etc/systemd/system"
