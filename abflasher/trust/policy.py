"""Whether a verified manifest may be installed here: compatible, not expired, not replayed, not a downgrade.

The device's memory of what it accepted lives in the state file (``trust`` key of state.json), so it travels with
the state into the new slot like the rest of it (abflasher/state.py keeps keys it does not know):

- ``time_floor``: the newest time this device can prove, i.e. the newest signed manifest creation time it has seen.
  A Pi has no real-time clock; after a power cut it may boot with the clock at 1970 or at a stale fake-hwclock
  value. Expiry is judged against ``max(system clock, time_floor)``, so a device whose clock is behind cannot be
  fed an expired manifest, and one whose clock is right is not held back by the floor.
- ``accepted_created`` / ``accepted_version``: the newest manifest this device accepted. A manifest created before it
  is a replay (an older, validly signed release offered again to roll the device back) and is refused unless the
  downgrade is authorized.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from abflasher import errors
from abflasher.config import Config
from abflasher.decisions import check_version_order
from abflasher.state import State
from abflasher.trust.manifest import Manifest, format_time
from abflasher.version import compare_versions

STATE_KEY = "trust"


@dataclass(frozen=True)
class TrustRecord:
    time_floor: int = 0
    accepted_created: int = 0
    accepted_version: str = ""

    @classmethod
    def of(cls, state: State) -> TrustRecord:
        data = state.extra.get(STATE_KEY)
        if not isinstance(data, dict):
            return cls()

        def number(key: str) -> int:
            value = data.get(key)
            return value if isinstance(value, int) and not isinstance(value, bool) else 0

        version = data.get("accepted_version")
        return cls(number("time_floor"), number("accepted_created"), version if isinstance(version, str) else "")

    def floor(self, now: float) -> int:
        """The time expiry and key validity are judged at: the newer of the clock and what the device has seen."""
        return max(int(now), self.time_floor)

    def seen(self, manifest: Manifest) -> TrustRecord:
        """After a verified manifest: the floor moves up to its creation time."""
        return TrustRecord(max(self.time_floor, manifest.created), self.accepted_created, self.accepted_version)

    def accepted(self, manifest: Manifest) -> TrustRecord:
        newest = manifest.created >= self.accepted_created
        return TrustRecord(
            max(self.time_floor, manifest.created),
            manifest.created if newest else self.accepted_created,
            manifest.version if newest else self.accepted_version,
        )

    def store(self, state: State) -> State:
        state.extra[STATE_KEY] = {
            "time_floor": self.time_floor,
            "accepted_created": self.accepted_created,
            "accepted_version": self.accepted_version,
        }
        return state


def device_compatibles(config: Config) -> tuple[str, ...]:
    """What this device is: ``compatible=`` of the configuration, else the device tree's compatible strings."""
    if config.compatible:
        return (config.compatible,)
    path = Path(config.proc_path) / "device-tree" / "compatible"
    try:
        raw = path.read_bytes()
    except OSError:
        return ()
    return tuple(part.decode("utf-8", "replace") for part in raw.split(b"\0") if part)


def check_manifest(
    manifest: Manifest,
    *,
    compatibles: Sequence[str],
    booted_version: str,
    requested_version: str,
    allow_downgrade: bool,
    record: TrustRecord,
    now: float,
    require_compatible: bool = True,
) -> None:
    """Raise the error that refuses ``manifest`` here, if any (its signature was already verified). A device with
    no compatible string at all accepts any only when ``require_compatible`` is off (a bundle in the simple mode,
    where compatible= empty means "not checked")."""
    if not compatibles and require_compatible:
        raise errors.Incompatible(
            "this device has no compatible string to check the update against (no device tree compatible): set "
            "compatible= in /etc/ab-flasher/ab-flasher.conf"
        )
    if compatibles and manifest.compatible not in compatibles:
        raise errors.Incompatible(
            f"the update is for {manifest.compatible!r}; this device is {' / '.join(repr(c) for c in compatibles)}"
        )
    floor = record.floor(now)
    if manifest.expires is not None and manifest.expires <= floor:
        raise errors.Expired(
            f"the update's manifest (version {manifest.version}) expired at {format_time(manifest.expires)}; this "
            f"device's time is at least {format_time(floor)}"
        )
    if requested_version and compare_versions(requested_version, manifest.version) != 0:
        raise errors.InvalidArgument(
            f"version {requested_version} was asked for, but the signed update is version {manifest.version}"
        )
    if manifest.created < record.accepted_created and not allow_downgrade:
        raise errors.Replay(
            f"the update's manifest (version {manifest.version}, created {format_time(manifest.created)}) is older "
            f"than one this device already accepted (version {record.accepted_version}, created "
            f"{format_time(record.accepted_created)}): a replayed release is refused unless the downgrade is "
            "authorized"
        )
    check_version_order(manifest.version, booted_version, allow_downgrade)
    if manifest.min_version and booted_version and compare_versions(booted_version, manifest.min_version) < 0:
        raise errors.Incompatible(
            f"version {manifest.version} can only be installed over {manifest.min_version} or newer; this device "
            f"runs {booted_version}: install an intermediate release first"
        )
