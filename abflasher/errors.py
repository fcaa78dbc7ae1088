"""One exception hierarchy for the whole product.

Every class carries the D-Bus error name the service sends (docs/dbus-api.md) and the exit code the command-line tools
return, so the engine, the service and the clients agree on what went wrong without translating by hand.
"""

from __future__ import annotations

DBUS_ERROR_PREFIX = "org.abflasher.Updater1.Error."


class AbFlasherError(Exception):
    """Base of every error ab-flasher reports on purpose."""

    name = "Internal"
    exit_code = 1

    @property
    def dbus_name(self) -> str:
        return DBUS_ERROR_PREFIX + self.name

    @classmethod
    def dbus_error_name(cls) -> str:
        return DBUS_ERROR_PREFIX + cls.name


class Internal(AbFlasherError):
    """An unexpected failure; its details go to the log, not to the caller."""

    name = "Internal"
    exit_code = 1


class InvalidArgument(AbFlasherError):
    name = "InvalidArgument"
    exit_code = 2


class NotAuthorized(AbFlasherError):
    name = "NotAuthorized"
    exit_code = 3


class Busy(AbFlasherError):
    name = "Busy"
    exit_code = 4


class UpToDate(AbFlasherError):
    name = "UpToDate"
    exit_code = 5


class Downgrade(AbFlasherError):
    name = "Downgrade"
    exit_code = 6


class Incompatible(AbFlasherError):
    name = "Incompatible"
    exit_code = 7


class Network(AbFlasherError):
    name = "Network"
    exit_code = 8


class BadImage(AbFlasherError):
    name = "BadImage"
    exit_code = 9


class TooLarge(AbFlasherError):
    name = "TooLarge"
    exit_code = 10


class ChecksumMismatch(AbFlasherError):
    name = "ChecksumMismatch"
    exit_code = 11


class Signature(AbFlasherError):
    name = "Signature"
    exit_code = 12


class NoTrial(AbFlasherError):
    name = "NoTrial"
    exit_code = 13


class Cancelled(AbFlasherError):
    name = "Cancelled"
    exit_code = 14


class DeviceError(AbFlasherError):
    """The target cannot be used: busy, mounted, not a block device, an I/O error."""

    name = "Device"
    exit_code = 15


# Refusals of signed updates (abflasher/trust/): each keeps its family's D-Bus name and exit code, so clients that
# know the family keep working, and says in its message exactly what was refused.


class Unsigned(Signature):
    """Trusted keys are configured and the update carries no signature (a bare image, a channel without .sig)."""


class UntrustedKey(Signature):
    """The signature is valid but made by a key that is not in allowed_signers."""


class KeyNotValid(Signature):
    """The signing key is trusted only outside this time (its valid-after / valid-before in allowed_signers)."""


class BadSignature(Signature):
    """The signature does not match the signed data, or is not an OpenSSH signature for ab-flasher."""


class Expired(Signature):
    """The signed manifest's expiry is past (against the device's time floor)."""


class Replay(Downgrade):
    """The manifest is older than one this device has already accepted."""


class BadBundle(BadImage):
    """A bundle whose members are out of order, unknown, duplicated, of the wrong size or type, or missing."""


class TruncatedBundle(BadBundle):
    """The bundle ended before its last member did."""


class BadManifest(BadImage):
    """A manifest that is not valid JSON or breaks the manifest schema (docs/trust.md)."""


class ManifestTooLarge(TooLarge):
    """A manifest or a signature larger than any real one is (refused before it is read)."""


class UnsupportedArtifact(Incompatible):
    """An artifact this version of the engine cannot install (e.g. a delta index without the delta installer)."""


ALL_ERRORS: tuple[type[AbFlasherError], ...] = (
    Internal,
    InvalidArgument,
    NotAuthorized,
    Busy,
    UpToDate,
    Downgrade,
    Incompatible,
    Network,
    BadImage,
    TooLarge,
    ChecksumMismatch,
    Signature,
    NoTrial,
    Cancelled,
    DeviceError,
)

_BY_NAME = {cls.name: cls for cls in ALL_ERRORS}


def from_dbus_name(dbus_name: str, message: str) -> AbFlasherError:
    """Rebuild the exception a client received over D-Bus; unknown names become Internal."""
    short = dbus_name.removeprefix(DBUS_ERROR_PREFIX)
    cls = _BY_NAME.get(short, Internal) if dbus_name.startswith(DBUS_ERROR_PREFIX) else Internal
    return cls(message)
