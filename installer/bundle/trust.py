"""Manifest trust decisions in a fixed order, with no I/O (after python-tuf's TrustedMetadataSet).

size cap → signature over the raw bytes → strict parse → platform → expiry → clock floor → rollback.
"""

from __future__ import annotations

import platform
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from appliance.errors import BundleError, PolicyError, SignatureError
from appliance.state import highest_sequence, time_floor, versions_at
from installer.bundle.manifest import MAX_MANIFEST_BYTES, Manifest, format_time, parse_manifest

SIGNATURE_SIZE = 64


def host_platform() -> str:
    """The platform string a bundle's wheelhouse must match, e.g. `linux-x86_64-cp311`."""
    return f"{sys.platform}-{platform.machine()}-cp{sys.version_info.major}{sys.version_info.minor}"


@dataclass(frozen=True)
class Policy:
    """What the host knows: the time, its platform, and what it installed before (from state.json)."""

    now: datetime
    platform: str | None = None  # None: do not check (inspecting a bundle for another host)
    highest_sequence: int = 0
    time_floor: datetime | None = None  # issued_at of the newest installed bundle
    versions_at_highest: frozenset[str] = frozenset()  # what was installed with that sequence

    @classmethod
    def from_state(cls, state: dict[str, Any], platform: str | None, now: datetime | None = None) -> Policy:
        """The policy of a host whose install state (state.json) is `state`."""
        top = highest_sequence(state)
        return cls(now=now or datetime.now(timezone.utc), platform=platform, highest_sequence=top,
                   time_floor=time_floor(state), versions_at_highest=versions_at(state, top))


def check_signature(raw: bytes, sig: bytes, trusted: list[Ed25519PublicKey]) -> Ed25519PublicKey:
    """Return the trusted key that signed `raw`."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BundleError(f"manifest.json is {len(raw)} bytes, above the {MAX_MANIFEST_BYTES}-byte cap.")
    if len(sig) != SIGNATURE_SIZE:
        raise SignatureError(f"manifest.sig is {len(sig)} bytes, not a {SIGNATURE_SIZE}-byte Ed25519 signature.")
    for key in trusted:
        try:
            key.verify(sig, raw)
            return key
        except InvalidSignature:
            continue
    raise SignatureError("manifest.sig is not a valid signature of manifest.json by any trusted vendor key.")


def check_policy(m: Manifest, policy: Policy) -> None:
    if policy.platform is not None and m.compatible != policy.platform:
        raise PolicyError(
            f"The bundle is built for {m.compatible!r} but this host is {policy.platform!r}.",
            "Ask the vendor for a bundle built for this platform.",
        )
    if policy.now >= m.expires_at:
        raise PolicyError(
            f"The bundle expired at {format_time(m.expires_at)} (now {format_time(policy.now)}).",
            "Ask the vendor for a fresh bundle, or check this host's clock.",
        )
    if policy.time_floor is not None and policy.now < policy.time_floor:
        raise PolicyError(
            f"This host's clock ({format_time(policy.now)}) is earlier than the installed bundle's issue time "
            f"({format_time(policy.time_floor)}); refusing to trust it.",
            "Set the system clock correctly and retry.",
        )
    if m.sequence == policy.highest_sequence and policy.versions_at_highest and m.version not in policy.versions_at_highest:
        raise PolicyError(
            f"The bundle's sequence {m.sequence} was installed here as version {', '.join(sorted(policy.versions_at_highest))}, "
            f"and this bundle calls it {m.version}: one sequence number cannot name two releases.",
            "Ask the vendor for a bundle with a higher sequence.",
        )
    if m.sequence < policy.highest_sequence:
        raise PolicyError(
            f"The bundle's sequence {m.sequence} is lower than the installed sequence {policy.highest_sequence}: a rollback.",
            "Use `appliance rollback` to return to an installed release, or bring a newer bundle.",
        )


def verify_manifest(raw: bytes, sig: bytes, trusted: list[Ed25519PublicKey], policy: Policy) -> tuple[Manifest, Ed25519PublicKey]:
    """The whole decision for one manifest; raises the first failure in the fixed order."""
    signer = check_signature(raw, sig, trusted)
    manifest = parse_manifest(raw)
    check_policy(manifest, policy)
    return manifest, signer
