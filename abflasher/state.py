"""The persisted state (/var/lib/ab-flasher/state.json) as typed values, and the file that holds it.

The JSON format is the one docs/architecture.md ("The state file") describes; these classes read and write exactly
that format, and keep keys they do not know (``extra``) so a file written by a newer version survives a round trip.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

STATE_FORMAT = 1
#: Root only: the state records where images came from, which is nobody else's business.
STATE_FILE_MODE = 0o600


class SlotState(enum.StrEnum):
    """A slot's state as the state file records it and the D-Bus API reports it."""

    GOOD = "good"
    TRIAL = "trial"
    BAD = "bad"
    INCOMPLETE = "incomplete"
    #: Never recorded by ab-flasher: what the API reports for a slot the state says nothing about.
    UNKNOWN = "unknown"


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _number(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass
class InstalledImage:
    """The last install into a slot: every field is optional (a commit records only its ``result``)."""

    version: str | None = None
    sha256: str | None = None
    time: int | None = None  # unix seconds
    result: str | None = None
    source: str | None = None  # where the image came from, credentials and query removed
    size: int | None = None  # bytes
    extra: dict[str, Any] = field(default_factory=dict)

    _KEYS = ("version", "sha256", "time", "result", "source", "size")

    @classmethod
    def from_json(cls, data: object) -> InstalledImage:
        if not isinstance(data, dict):
            return cls()
        return cls(
            version=_text(data.get("version")),
            sha256=_text(data.get("sha256")),
            time=_number(data.get("time")),
            result=_text(data.get("result")),
            source=_text(data.get("source")),
            size=_number(data.get("size")),
            extra={key: value for key, value in data.items() if key not in cls._KEYS},
        )

    def to_json(self) -> dict[str, Any]:
        data = dict(self.extra)
        for key in self._KEYS:
            value = getattr(self, key)
            if value is not None:
                data[key] = value
        return data


@dataclass
class SlotRecord:
    state: SlotState = SlotState.UNKNOWN
    installed: InstalledImage = field(default_factory=InstalledImage)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: object) -> SlotRecord:
        if not isinstance(data, dict):
            return cls()
        try:
            state = SlotState(data.get("state", SlotState.UNKNOWN))
        except ValueError:
            state = SlotState.UNKNOWN
        return cls(
            state=state,
            installed=InstalledImage.from_json(data.get("installed")),
            extra={key: value for key, value in data.items() if key not in ("state", "installed")},
        )

    def to_json(self) -> dict[str, Any]:
        data = dict(self.extra)
        data["state"] = self.state.value
        installed = self.installed.to_json()
        if installed:
            data["installed"] = installed
        return data


@dataclass(frozen=True)
class ArmedTrial:
    """A trial waits for ``slot``; ``armed_boot_id`` (the kernel's boot_id) tells the arming boot from the next."""

    slot: str
    armed_boot_id: str

    @classmethod
    def from_json(cls, data: object) -> ArmedTrial | None:
        if not isinstance(data, dict) or not isinstance(data.get("slot"), str) or not data["slot"]:
            return None
        return cls(slot=data["slot"], armed_boot_id=_text(data.get("armed_boot_id")) or "")

    def to_json(self) -> dict[str, Any]:
        return {"slot": self.slot, "armed_boot_id": self.armed_boot_id}


@dataclass
class State:
    slots: dict[str, SlotRecord] = field(default_factory=dict)
    trial: ArmedTrial | None = None
    primary: str | None = None  # the last known committed slot
    rollback_boot_id: str | None = None  # the boot in which the user rolled back to the running slot
    generation: int = 0  # every save increments it; the higher of the two slots' copies wins
    device: str | None = None  # the disk identifier of the device that wrote it
    format: int = STATE_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    _KEYS = ("slots", "trial", "primary", "rollback_boot_id", "generation", "device", "format")

    def slot(self, name: str) -> SlotRecord:
        """The record of slot ``name``, created (unknown, nothing installed) if the state has none yet."""
        return self.slots.setdefault(name, SlotRecord())

    def recorded(self, name: str) -> SlotState:
        """What the state says of slot ``name`` (unknown when it says nothing), without adding a record."""
        record = self.slots.get(name)
        return record.state if record is not None else SlotState.UNKNOWN

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> State:
        slots = data.get("slots")
        generation = _number(data.get("generation"))
        return cls(
            slots={
                name: SlotRecord.from_json(record)
                for name, record in (slots.items() if isinstance(slots, dict) else ())
                if isinstance(name, str)
            },
            trial=ArmedTrial.from_json(data.get("trial")),
            primary=_text(data.get("primary")) or None,
            rollback_boot_id=_text(data.get("rollback_boot_id")),
            generation=generation if generation is not None else 0,
            device=_text(data.get("device")),
            format=_number(data.get("format")) or STATE_FORMAT,
            extra={key: value for key, value in data.items() if key not in cls._KEYS},
        )

    def to_json(self) -> dict[str, Any]:
        data = dict(self.extra)
        data.update(
            format=self.format,
            generation=self.generation,
            slots={name: record.to_json() for name, record in self.slots.items()},
        )
        for key, value in (("device", self.device), ("primary", self.primary), ("rollback_boot_id",
                                                                                 self.rollback_boot_id)):
            if value is not None:
                data[key] = value
        if self.trial is not None:
            data["trial"] = self.trial.to_json()
        return data

    @classmethod
    def parse(cls, text: str | bytes) -> State:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return cls.from_json(data)

    def dump(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n"


class StateFile:
    """/var/lib/ab-flasher/state.json: per slot the last install, the armed trial, the last known primary.

    Written atomically (temp file, fsync, rename, fsync the directory), so a power cut leaves the old or the new
    state, never a mix. An unreadable file is kept aside as state.json.corrupt and treated as empty: the disk and
    the firmware files remain the truth about what boots; the state only adds history.

    /var/lib is part of each slot's root, so each slot holds its own copy: the update carries the state into the new
    root (``State.dump`` of a ``stamp``-ed state), and ``load`` also takes the other slot's copy (read by the caller
    once per operation, see abflasher/device.py) and keeps whichever has the higher ``generation``, which every save
    increments. So the new slot knows on its trial boot that it was armed, and the old slot learns after a fallback
    or a rollback what happened while the other one ran.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()

    def _load_own(self) -> State:
        try:
            return State.parse(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return State()
        except (OSError, ValueError) as exc:
            log.error("state file %s is unreadable (%s); starting from an empty state", self.path, exc)
            with contextlib.suppress(OSError):
                self.path.replace(self.path.with_suffix(".json.corrupt"))
            return State()

    @staticmethod
    def _usable_other(other_copy: bytes | None, device: str | None) -> State | None:
        if not other_copy:
            return None
        try:
            other = State.parse(other_copy)
        except ValueError as exc:
            # The other slot may be half-written or hold another system: its copy is only a hint.
            log.info("the other slot's state copy is unusable (%s); using this slot's", exc)
            return None
        # A copy that came with an image (made on another device) says nothing about this one.
        return other if device is not None and other.device == device else None

    def load(self, other_copy: bytes | None = None, device: str | None = None) -> State:
        """This slot's copy, or ``other_copy`` (the other slot's) when it is newer and from this ``device``."""
        with self._lock:
            own = self._load_own()
            other = self._usable_other(other_copy, device)
            return other if other is not None and other.generation > own.generation else own

    @staticmethod
    def stamp(state: State, device: str | None) -> State:
        """``state`` as the next save writes it: one generation newer, marked with this device's disk id."""
        state.generation += 1
        if device is not None:
            state.device = device
        return state

    def save(self, state: State, device: str | None) -> None:
        with self._lock:
            write_atomically(self.path, self.stamp(state, device).dump(), mode=STATE_FILE_MODE)

    def update(self, change: Callable[[State], State], other_copy: bytes | None, device: str | None) -> State:
        """Load, ``change`` and save the state as one step (against other threads of this process)."""
        with self._lock:
            new = change(self.load(other_copy, device))
            self.save(new, device)
            return new


def write_atomically(
    path: Path, text: str | bytes | Callable[[IO[bytes]], object], *, mode: int = 0o644,
    owner: tuple[int, int] | None = None
) -> None:
    """Replace ``path`` with ``text`` (UTF-8 text, bytes as they are, or what a function writes to the file it is
    given) so a power cut leaves the old or the new file: temp file, fsync, rename, fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    data = text.encode("utf-8") if isinstance(text, str) else text
    try:
        with os.fdopen(fd, "wb") as handle:
            if isinstance(data, bytes):
                handle.write(data)
            else:
                data(handle)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            if owner is not None:
                os.fchown(handle.fileno(), *owner)
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
