"""The engine's public request and result types: what the service, the CLI and the tests pass to and get from
``Updater`` (abflasher/updater.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from abflasher.image.pipeline import Progress


@dataclass(frozen=True)
class SlotStatus:
    name: str  # "a" | "b" (| "recovery")
    role: str  # "system" | "recovery"
    device: str  # root partition device, e.g. /dev/mmcblk0p3
    partuuid: str
    size: int  # bytes
    version: str  # "" when unknown/empty
    booted: bool
    primary: bool
    state: str  # a abflasher.state.SlotState value: good, trial, bad, incomplete, unknown
    installed: dict[str, Any] = field(default_factory=dict)  # version, sha256, time (unix s), result, source


@dataclass(frozen=True)
class SystemStatus:
    layout: str
    booted_slot: str
    primary_slot: str
    booted_version: str
    trial_active: bool
    slots: tuple[SlotStatus, ...]
    auto_update: str = ""  # the last unattended update run's outcome (abflasher/autoupdate.py); "" if none


@dataclass(frozen=True)
class UpdateRequest:
    version: str = ""  # required unless fd given; with fd, optional (then checked against the image's /.ab_version)
    url: str = ""  # overrides the config template
    sha256: str = ""  # overrides the checksum file
    allow_downgrade: bool = False
    reboot: bool = False  # reboot into the trial when done
    fd: int | None = None  # UpdateFromFd: an open fd the updater takes ownership of (closes it)
    size: int | None = None  # bytes the fd will deliver, for percent
    store: str = ""  # a delta update's chunk store (url names a .caibx); empty: configured or casync's default


@dataclass(frozen=True)
class PreparedUpdate:
    """A validated request: what will be written where. Made quickly, before the job starts."""

    request: UpdateRequest
    target_slot: str
    image_url: str
    description: str


@dataclass(frozen=True)
class UpdateOutcome:
    slot: str
    version: str
    sha256: str
    rebooting: bool
    message: str


@dataclass(frozen=True)
class CheckResult:
    current: str
    available: str
    update_available: bool
    # What a signed channel says of its release (empty in the simple mode).
    signer: str = ""
    compatible: str = ""
    created: int = 0  # unix seconds
    expires: int = 0  # unix seconds; 0: never
    size: int = 0  # the image, uncompressed
    download_size: int = 0  # what an update downloads
    release_notes: str = ""


@dataclass(frozen=True)
class BootCheckResult:
    trial: bool  # was this boot a trial
    committed: bool
    message: str


ProgressCallback = Callable[[Progress], None]
