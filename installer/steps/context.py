"""What every install, upgrade, rollback and uninstall step receives: the options, the target and
runner to act through, and the typed results of the steps before it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from appliance.paths import Layout
from installer.bundle.manifest import Manifest
from installer.steps.framework import Emit
from installer.system.release import Release, ReleasePlan
from installer.system.runner import Runner
from installer.system.target import Target

if TYPE_CHECKING:
    from installer.hardware.machine import Machine
    from installer.planning.tiers import Tier


@dataclass(frozen=True)
class Verified:
    manifest: Manifest
    release_id: str
    signer: str  # the signing key's fingerprint
    trust: str  # how the keys to verify with were chosen
    pin: Ed25519PublicKey | None  # a first install's vendor key, to pin under /etc/appliance/trust
    current: bool  # this very release is installed, recorded and current: nothing to do


@dataclass
class Options:
    bundle: Path | None = None
    upgrade: bool = False
    tier: str | None = None
    key_file: Path | None = None
    passphrase_file: Path | None = None
    trust: Path | None = None
    trust_fingerprint: str | None = None
    yes: bool = False
    no_systemd: bool = False
    machine: Path | None = None
    host: str | None = None
    port: int | None = None
    ready_timeout: float = 600.0
    python: str | None = None  # the interpreter that builds the release venv (default: this one)


@dataclass
class Context:
    layout: Layout
    opts: Options
    runner: Runner
    target: Target
    emit: Emit
    confirm: Callable[[str], bool]
    systemd_running: bool = False
    verified: Verified | None = None  # the verify step's result
    plan: ReleasePlan | None = None  # the plan step's (rollback: the release's own)
    machine: Machine | None = None
    tier: Tier | None = None
    previous: Release | None = None
    config: dict[str, dict[str, Any]] = field(default_factory=dict)  # appliance.toml as the config step left it
    started: bool = False
    notices: list[str] = field(default_factory=list)

    @property
    def dry_run(self) -> bool:
        return self.target.dry_run

    @property
    def uses_systemd(self) -> bool:
        return not self.opts.no_systemd

    @property
    def release_id(self) -> str:
        """The release being installed (or rolled back to): the plan's, or the verified bundle's before it."""
        if self.plan is not None:
            return self.plan.id
        assert self.verified is not None, "the verify step runs first"
        return self.verified.release_id

    @property
    def manifest(self) -> Manifest:
        assert self.verified is not None, "the verify step runs first"
        return self.verified.manifest

    def planned(self) -> ReleasePlan:
        assert self.plan is not None, "the plan step runs first"
        return self.plan
