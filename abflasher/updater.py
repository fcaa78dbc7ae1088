"""The update state machine (DESIGN §4): one job at a time, persisted state, health-checked commit.

API SKELETON — implementation in progress. The service (abflasher/service) codes against these signatures.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from abflasher.config import Config
from abflasher.image.pipeline import Progress

#: Slot states as the D-Bus API reports them.
SLOT_STATES = ("good", "trial", "bad", "incomplete", "unknown")


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
    state: str  # one of SLOT_STATES
    installed: dict[str, Any] = field(default_factory=dict)  # version, sha256, time (unix s), result, source


@dataclass(frozen=True)
class SystemStatus:
    layout: str
    booted_slot: str
    primary_slot: str
    booted_version: str
    trial_active: bool
    slots: tuple[SlotStatus, ...]


@dataclass(frozen=True)
class UpdateRequest:
    version: str = ""  # required unless fd given; with fd, optional (then checked against the image's /.ab_version)
    url: str = ""  # overrides the config template
    sha256: str = ""  # overrides the checksum file
    allow_downgrade: bool = False
    reboot: bool = False  # reboot into the trial when done
    fd: int | None = None  # UpdateFromFd: an open fd the updater takes ownership of (closes it)
    size: int | None = None  # bytes the fd will deliver, for percent


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


@dataclass(frozen=True)
class BootCheckResult:
    trial: bool  # was this boot a trial
    committed: bool
    message: str


ProgressCallback = Callable[[Progress], None]


class Updater:
    def __init__(self, config: Config) -> None:
        self.config = config

    def status(self) -> SystemStatus:
        raise NotImplementedError

    def prepare(self, request: UpdateRequest) -> PreparedUpdate:
        """Validate a request quickly (raises InvalidArgument, UpToDate, Downgrade, Busy, NoTrial...)."""
        raise NotImplementedError

    def run(self, prepared: PreparedUpdate, progress: ProgressCallback, cancel: threading.Event) -> UpdateOutcome:
        """Blocking: stream, verify, fix up, arm the trial, optionally reboot. Call from a worker thread."""
        raise NotImplementedError

    def check(self) -> CheckResult:
        raise NotImplementedError

    def mark_good(self) -> None:
        """Commit the booted trial slot (NoTrial if not in a trial)."""
        raise NotImplementedError

    def mark_bad(self) -> None:
        """Reject the booted trial slot: the next boot returns to the committed slot (NoTrial if not in a trial)."""
        raise NotImplementedError

    def rollback(self) -> None:
        """Make the other good slot primary (committed)."""
        raise NotImplementedError

    def reboot(self, mode: str) -> None:
        """mode: normal | trial (try the freshly written slot) | recovery."""
        raise NotImplementedError

    def boot_check(self) -> BootCheckResult:
        """On boot: reconcile state; on a trial boot run the health checks and commit or reject."""
        raise NotImplementedError
