"""One error base class with a user-facing message, a hint and an exit code.

Every surface renders these in one place: the CLI prints them and exits, the console shows a
notification, the HTTP server answers with the OpenAI error shape.
"""

from __future__ import annotations


class ApplianceError(Exception):
    """An expected failure: one sentence saying what is wrong, and a hint saying what to do."""

    exit_code = 1
    default_hint = ""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = self.default_hint if hint is None else hint

    def __str__(self) -> str:
        return self.message


class UsageError(ApplianceError):
    exit_code = 2


class BundleError(ApplianceError):
    """The bundle on disk is malformed, incomplete or does not match its manifest."""

    exit_code = 10
    default_hint = "Copy the bundle onto the stick again from the vendor's original and retry."


class SignatureError(BundleError):
    exit_code = 11
    default_hint = (
        "Check that the bundle comes from your vendor and that the trusted key is the one "
        "whose fingerprint the vendor gave you out of band."
    )


class PolicyError(BundleError):
    """Signed and intact, but refused: expired, rolled back, frozen clock, wrong platform."""

    exit_code = 12


class DecryptError(ApplianceError):
    exit_code = 13
    default_hint = "Use the key file or passphrase that came with this bundle, on its own stick."


class KeyMaterialError(ApplianceError):
    """A key file or passphrase file that cannot be used."""

    exit_code = 14


class SpecError(ApplianceError):
    exit_code = 15
    default_hint = "See bundles/README.md for the bundle spec format."


class StateError(ApplianceError):
    exit_code = 16


class HardwareError(ApplianceError):
    exit_code = 20


class TierError(ApplianceError):
    exit_code = 21


class EngineError(ApplianceError):
    exit_code = 30
