"""One error base class with a user-facing message, a hint, an exit code and an HTTP status.

Every surface renders these in one place: the CLI prints them and exits, the console shows a
notification, the HTTP server answers with the OpenAI error shape (appliance/server/app.py).
"""

from __future__ import annotations

from typing import Any

# Every error's exit code, in one table: a code means one thing. A subclass of ApplianceError that
# is not listed here fails at import, so a new error cannot take a code another one has.
EXIT_CODES = {
    "ApplianceError": 1, "UsageError": 2,
    # bundles and their keys
    "BundleError": 10, "SignatureError": 11, "PolicyError": 12, "DecryptError": 13, "KeyMaterialError": 14,
    "SpecError": 15, "StateError": 16, "ConfigError": 17, "ApiKeyError": 18, "AuditBroken": 19,
    # the machine
    "HardwareError": 20, "TierError": 21,
    # serving
    "EngineError": 30, "ChatTemplateError": 31, "QueueFull": 32, "ConstraintError": 33,
    # training and adapters
    "AdapterError": 40, "TrainerConfigError": 41, "BaseModelError": 42, "TrainingError": 43, "ExportError": 44,
    "TrainerBusy": 45, "DeviceError": 46,
    # install steps
    "CommandError": 50, "NotReadyError": 51, "LockedError": 52,
    # the console
    "ConsoleKeyError": 60, "ServerDown": 61, "ServerRefused": 62,
}


class ApplianceError(Exception):
    """An expected failure: one sentence saying what is wrong, and a hint saying what to do."""

    exit_code = EXIT_CODES["ApplianceError"]
    default_hint = ""
    # How the API answers one that escapes a route: a failure of the server's side unless a
    # subclass says the request was at fault.
    http_status = 500
    openai_type = "server_error"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__name__ not in EXIT_CODES:
            raise TypeError(f"{cls.__name__} has no exit code in appliance.errors.EXIT_CODES; add one that is not taken.")
        cls.exit_code = EXIT_CODES[cls.__name__]

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = self.default_hint if hint is None else hint

    def __str__(self) -> str:
        return self.message


class UsageError(ApplianceError):
    http_status = 400
    openai_type = "invalid_request_error"


class BundleError(ApplianceError):
    """The bundle on disk is malformed, incomplete or does not match its manifest."""

    default_hint = "Copy the bundle onto the stick again from the vendor's original and retry."


class SignatureError(BundleError):
    default_hint = (
        "Check that the bundle comes from your vendor and that the trusted key is the one "
        "whose fingerprint the vendor gave you out of band."
    )


class PolicyError(BundleError):
    """Signed and intact, but refused: expired, rolled back, frozen clock, wrong platform."""


class DecryptError(ApplianceError):
    default_hint = "Use the key file or passphrase that came with this bundle, on its own stick."


class KeyMaterialError(ApplianceError):
    """A key file or passphrase file that cannot be used."""


class SpecError(ApplianceError):
    default_hint = "See bundles/README.md for the bundle spec format."


class StateError(ApplianceError):
    """What is on disk (state.json, a release, a model) is not what it must be."""


class HardwareError(ApplianceError):
    """This machine cannot run what was asked (a missing library, a CPU or GPU that does not fit)."""


class TierError(ApplianceError):
    """No tier of the bundle fits, or the one asked for does not."""


class EngineError(ApplianceError):
    http_status = 503  # the model cannot answer now; the request itself may be fine
