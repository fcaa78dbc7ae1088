"""The update state machine (docs/architecture.md): one job at a time, persisted state, health-checked commit.

1. resolve the request (version → URL and expected sha256; refuse up-to-date, downgrades, other boards);
2. pick the target: the slot that is neither booted nor the committed primary, never the booted one;
3. stream + 4. read-back verify (``install_image``), with the target marked *incomplete* in the state file first;
5. fix up the new root (its /etc/fstab and boot files' ``root=`` point at its own PARTUUIDs), check its version;
6. arm a one-shot trial of it; the primary stays the old slot; 7. optionally reboot into the trial;
8. on the trial boot, run the health checks and commit, or reject so the next reset returns to the old slot.

The engine never imports D-Bus; the service runs ``run()`` in a worker thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from abflasher import errors
from abflasher.boot import bootfiles
from abflasher.boot.base import Bootloader
from abflasher.boot.fat import FatVolume
from abflasher.boot.raspberrypi import bootloader_for
from abflasher.config import Config
from abflasher.disk.slots import (
    COMPATIBLE_FILE,
    VERSION_FILE,
    DiskLayout,
    Slot,
    booted_slot,
    detect_layout,
    find_booted_root,
    read_file_from_ext,
    read_tryboot_flag,
    read_version_file,
    slot_version,
)
from abflasher.disk.table import read_table
from abflasher.health import run_check
from abflasher.image.locations import check_http_url, redact_url
from abflasher.image.pipeline import Progress
from abflasher.version import compare_versions, parse_version

log = logging.getLogger(__name__)

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


STATE_FORMAT = 1
#: Root only: the state records where images came from, which is nobody else's business.
STATE_FILE_MODE = 0o600
BOOT_CHECK_LOCK_WAIT = 120.0


class StateFile:
    """/var/lib/ab-flasher/state.json: per slot the last install, the armed trial, the last known primary.

    Written atomically (temp file, fsync, rename, fsync the directory), so a power cut leaves the old or the new
    state, never a mix. An unreadable file is kept aside as state.json.corrupt and treated as empty: the disk and
    the firmware files remain the truth about what boots; the state only adds history.

    /var/lib is part of each slot's root, so each slot holds its own copy: the update carries the state into the new
    root (``dump``), and ``load`` also reads the other slot's copy (``other_copy``) and keeps whichever has the
    higher ``generation``, which every save increments. So the new slot knows on its trial boot that it was armed,
    and the old slot learns after a fallback or a rollback what happened while the other one ran.
    """

    def __init__(
        self,
        path: Path,
        other_copy: Callable[[], bytes | None] | None = None,
        device_id: Callable[[], str] | None = None,
    ) -> None:
        self.path = path
        self._other_copy = other_copy
        self._device_id = device_id
        self._lock = threading.RLock()

    @staticmethod
    def _parse(text: str | bytes) -> dict[str, Any]:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data

    def _load_own(self) -> dict[str, Any]:
        try:
            return self._parse(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.error("state file %s is unreadable (%s); starting from an empty state", self.path, exc)
            with contextlib.suppress(OSError):
                self.path.replace(self.path.with_suffix(".json.corrupt"))
            return {}

    def _load_other(self) -> dict[str, Any]:
        try:
            raw = self._other_copy() if self._other_copy is not None else None
            other = self._parse(raw) if raw else {}
            # A copy that came with an image (made on another device) says nothing about this one.
            if other and (self._device_id is None or other.get("device") != self._device_id()):
                return {}
            return other
        except (ValueError, errors.AbFlasherError) as exc:
            # The other slot may be half-written or hold another system: its copy is only a hint.
            log.info("the other slot's state copy is unusable (%s); using this slot's", exc)
            return {}

    def load(self) -> dict[str, Any]:
        with self._lock:
            own = self._load_own()
            other = self._load_other()
            data = other if int(other.get("generation", 0)) > int(own.get("generation", 0)) else own
            data.setdefault("format", STATE_FORMAT)
            data.setdefault("generation", 0)
            data.setdefault("slots", {})
            return data

    @staticmethod
    def dump(data: dict[str, Any]) -> str:
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def stamp(self, data: dict[str, Any]) -> dict[str, Any]:
        """``data`` as the next save writes it: one generation newer, marked with this device's disk id."""
        data["generation"] = int(data.get("generation", 0)) + 1
        if self._device_id is not None:
            data["device"] = self._device_id()
        return data

    def save(self, data: dict[str, Any]) -> None:
        with self._lock:
            _write_atomically(self.path, self.dump(self.stamp(data)), mode=STATE_FILE_MODE)

    @contextlib.contextmanager
    def edit(self) -> Iterator[dict[str, Any]]:
        with self._lock:
            data = self.load()
            yield data
            self.save(data)


def _write_atomically(path: Path, text: str, *, mode: int = 0o644, owner: tuple[int, int] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
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


@dataclass
class _System:
    """One look at the device: what the disk, the firmware files and the running kernel say."""

    layout: DiskLayout
    boot: Bootloader
    booted: Slot
    primary: str
    tryboot_flag: bool | None
    boot_id: str


Runner = Callable[[Sequence[str], float], "subprocess.CompletedProcess[str]"]


def _run_command(cmd: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)


class Updater:
    """Everything privileged ab-flasher does, behind one object per device (thread-safe, one job at a time)."""

    def __init__(
        self,
        config: Config,
        *,
        runner: Runner = _run_command,
        open_fat: Callable[[str], FatVolume] | None = None,
        check_runner: Runner = run_check,
    ) -> None:
        self.config = config
        self.state = StateFile(config.state_file, self._other_slot_state, self._device_id)
        self._run = runner
        self._run_check = check_runner  # health checks: killed with their whole process group at the timeout
        self._open_fat = open_fat
        self._job = threading.Lock()

    @contextlib.contextmanager
    def _exclusive(self, *, wait: float = 0.0) -> Iterator[None]:
        """One change of the device at a time, across threads and processes (ab-flasherd and the boot check may
        run at the same moment at boot): a thread lock plus an flock on state_dir/lock. Without ``wait``, a
        holder means Busy at once."""
        acquired = self._job.acquire(timeout=wait) if wait > 0 else self._job.acquire(blocking=False)
        if not acquired:
            raise errors.Busy("another update or boot operation is running")
        try:
            lock_path = Path(self.config.state_dir, "lock")
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                deadline = time.monotonic() + wait
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() >= deadline:
                            raise errors.Busy(
                                "another ab-flasher process (the service or the boot check) is changing the device"
                            ) from None
                        time.sleep(0.2)
                yield
            finally:
                os.close(fd)
        finally:
            self._job.release()

    # ----------------------------------------------------------------------------------------------- looking

    def _boot_id(self) -> str:
        try:
            return Path(self.config.proc_path, "sys", "kernel", "random", "boot_id").read_text().strip()
        except OSError:
            return ""

    def _state_in_root(self) -> str | None:
        """Where the state file is inside a root file system, if it lives on the running root (as installed it
        does: /var/lib/ab-flasher); None when it is kept elsewhere (a shared partition, a test's directory)."""
        try:
            if os.stat(self.config.state_dir).st_dev != os.stat(self.config.root_path).st_dev:
                return None
        except OSError:
            return None
        return "/" + os.path.relpath(self.config.state_file, self.config.root_path)

    def _device_id(self) -> str:
        return self._disk()[0].table.ptuuid

    def _other_slot_state(self) -> bytes | None:
        inside = self._state_in_root()
        if inside is None:
            return None
        layout, _boot, booted = self._disk()
        return read_file_from_ext(layout.other(booted.name).root_device, inside)

    def _disk(self) -> tuple[DiskLayout, Bootloader, Slot]:
        cfg = self.config
        booted_root = find_booted_root(
            root_path=cfg.root_path, proc_path=cfg.proc_path, sys_path=cfg.sys_path, dev_path=cfg.dev_path
        )
        disk = cfg.disk or booted_root.disk
        if not disk:
            raise errors.Incompatible(
                "cannot tell which disk holds the slots (the root file system is not on a partition): "
                "set disk= in /etc/ab-flasher/ab-flasher.conf"
            )
        layout = detect_layout(read_table(disk), disk, cfg.layout)
        boot = bootloader_for(layout, self._open_fat, trial_watchdog_timeout=cfg.trial_watchdog_timeout)
        return layout, boot, booted_slot(layout, booted_root)

    def _system(self) -> _System:
        layout, boot, booted = self._disk()
        flag, _partition = read_tryboot_flag(self.config.proc_path)
        return _System(layout, boot, booted, boot.primary(), flag, self._boot_id())

    def _trial_active(self, system: _System, state: dict[str, Any]) -> bool:
        """Is the running slot on trial? The firmware says so when the device tree has the tryboot flag;
        otherwise a booted slot other than the primary is a trial, unless we just rolled back to it."""
        if system.booted.name == system.primary or state.get("rollback_boot_id") == system.boot_id:
            return False
        return system.tryboot_flag is not False

    def _slot_state(
        self, system: _System, state: dict[str, Any], slot: Slot, version: str, *, on_trial: bool
    ) -> str:
        recorded = state["slots"].get(slot.name, {}).get("state")
        if on_trial:
            return "bad" if recorded == "bad" else "trial"
        if slot.name == system.booted.name and slot.name == system.primary:
            return "good"
        if recorded in ("good", "trial", "bad", "incomplete"):
            return str(recorded)
        if slot.name == system.primary and version:
            return "good"
        return "unknown"

    def status(self) -> SystemStatus:
        system = self._system()
        state = self.state.load()
        trial = self._trial_active(system, state)
        slots = []
        booted_version = ""
        for slot in system.layout.slots:
            is_booted = slot.name == system.booted.name
            version = slot_version(slot, booted=is_booted, root_path=self.config.root_path)
            if is_booted:
                booted_version = version
            slots.append(
                SlotStatus(
                    name=slot.name,
                    role=slot.role,
                    device=slot.root_device,
                    partuuid=slot.root_partuuid,
                    size=slot.size,
                    version=version,
                    booted=is_booted,
                    primary=slot.name == system.primary,
                    state=self._slot_state(system, state, slot, version, on_trial=trial and is_booted),
                    installed=_shown_install(state["slots"].get(slot.name, {}).get("installed", {})),
                )
            )
        return SystemStatus(
            layout=system.layout.kind,
            booted_slot=system.booted.name,
            primary_slot=system.primary,
            booted_version=booted_version,
            trial_active=trial,
            slots=tuple(slots),
        )

    # ----------------------------------------------------------------------------------------------- updating

    def prepare(self, request: UpdateRequest) -> PreparedUpdate:
        if request.fd is None and not request.version:
            raise errors.InvalidArgument("say which version to install (or upload an image)")
        if request.version:
            parse_version(request.version)
        if request.sha256:
            from abflasher.image.checksums import normalize_sha256

            normalize_sha256(request.sha256)
        system = self._system()
        state = self.state.load()
        if self._trial_active(system, state):
            raise errors.Busy(
                f"slot {system.booted.name} is running on trial: commit it (mark-good) or reject it (mark-bad) "
                "before installing another update"
            )
        target = next(
            (s for s in system.layout.slots if s.name not in (system.booted.name, system.primary)), None
        )
        if target is None:
            raise errors.Busy(
                f"slot {system.primary} is committed but slot {system.booted.name} is running: reboot first"
            )
        booted_version = slot_version(system.booted, booted=True, root_path=self.config.root_path)
        if request.version:
            self._check_order(request.version, booted_version, request.allow_downgrade)
        image_url = ""
        if request.fd is None:
            image_url = request.url or self.config.image_url_for(request.version)
            check_http_url(image_url)
        # The description is stored, logged and shown to every bus client: never a password or token.
        description = "uploaded image" if request.fd is not None else redact_url(image_url)
        return PreparedUpdate(request, target.name, image_url, description)

    @staticmethod
    def _check_order(version: str, booted_version: str, allow_downgrade: bool) -> None:
        if not booted_version:
            return
        order = compare_versions(version, booted_version)
        if order == 0:
            raise errors.UpToDate(f"version {version} is already running")
        if order < 0 and not allow_downgrade:
            raise errors.Downgrade(
                f"version {version} is older than the running {booted_version}: allow the downgrade explicitly "
                "(--allow-downgrade)"
            )

    def _expected_sha256(self, prepared: PreparedUpdate, cancel: threading.Event | None = None) -> str | None:
        from abflasher.image.checksums import fetch_checksum, normalize_sha256
        from abflasher.image.http import http_options

        request = prepared.request
        if request.sha256:
            return normalize_sha256(request.sha256)
        if request.fd is not None:
            return None
        checksum_url = self.config.checksum_url_for(request.version, prepared.image_url)
        if not checksum_url:
            if self.config.require_checksum:
                raise errors.InvalidArgument("no checksum for the image: configure checksum_url or pass a sha256")
            return None
        image_name = os.path.basename(prepared.image_url.split("?", 1)[0])
        return fetch_checksum(checksum_url, image_name, **http_options(self.config, cancel))

    def _record(self, slot: str, slot_state: str, **installed: Any) -> None:
        with self.state.edit() as state:
            entry = state["slots"].setdefault(slot, {})
            entry["state"] = slot_state
            entry.setdefault("installed", {}).update(installed)
            if state.get("trial", {}).get("slot") == slot and slot_state != "trial":
                state.pop("trial", None)

    def run(self, prepared: PreparedUpdate, progress: ProgressCallback, cancel: threading.Event) -> UpdateOutcome:
        try:
            with self._exclusive():
                return self._run_update(prepared, progress, cancel)
        finally:
            if prepared.request.fd is not None:
                with contextlib.suppress(OSError):
                    os.close(prepared.request.fd)

    def _run_update(
        self, prepared: PreparedUpdate, progress: ProgressCallback, cancel: threading.Event
    ) -> UpdateOutcome:
        from abflasher.image.http import open_http
        from abflasher.image.sources import FdSource, ImageSource
        from abflasher.install import install_image

        request = prepared.request
        progress(Progress("preparing", 0, None, 0))
        system = self._system()
        target = system.layout.slot(prepared.target_slot)
        if target.name in (system.booted.name, system.primary):
            raise errors.Busy(f"slot {target.name} is in use (booted or committed); refusing to write it")
        self._unmount_leftovers()
        expected = self._expected_sha256(prepared, cancel)
        if cancel.is_set():
            raise errors.Cancelled("the update was cancelled")

        # From here on the target is not trusted until every step passed.
        system.boot.disarm()
        self._record(
            target.name,
            "incomplete",
            version=request.version,
            sha256="",
            time=int(time.time()),
            result="writing",
            source=prepared.description,
        )
        source: ImageSource | None = None
        try:
            # Opened inside the try: a first request that fails is a failed install like any other.
            if request.fd is not None:
                source = FdSource(
                    os.dup(request.fd),
                    prepared.description,
                    cancel=cancel,
                    idle_timeout=self.config.upload_idle_timeout,
                )
            else:
                source = open_http(self.config, prepared.image_url, cancel=cancel)
            result = install_image(
                source,
                target.root_device,
                expected_sha256=expected,
                gzip_impl=self.config.gzip_inflater,
                source_size=request.size,
                progress=progress,
                cancel=cancel,
            )
        except errors.ChecksumMismatch as exc:
            self._record(target.name, "bad", result=f"failed: {exc}")
            raise
        except errors.AbFlasherError as exc:
            self._record(target.name, "incomplete", result=f"failed: {exc}")
            raise
        except BaseException:
            self._record(target.name, "incomplete", result="failed: internal error")
            raise
        finally:
            if source is not None:
                source.close()

        progress(Progress("configuring", 0, None, result.image_size))
        installed = {
            "version": request.version,
            "sha256": result.sha256,
            "time": int(time.time()),
            "result": "installed",
            "source": prepared.description,
            "size": result.image_size,
        }
        try:
            version = self._fix_up_root(system, target, request, installed)
            if cancel.is_set():
                raise errors.Cancelled("the update was cancelled")
            with tempfile.TemporaryDirectory(prefix="boot-artifact-", dir=self._run_dir()) as tmp:
                artifact = self._fetch_boot_artifact(prepared, Path(tmp), cancel)
                system.boot.install_boot_files(target, system.booted, artifact)
            system.boot.set_trial(target.name)
        except (errors.BadImage, errors.Incompatible, errors.UpToDate, errors.Downgrade) as exc:
            # A complete, verified image that must not run here.
            self._record(target.name, "bad", result=f"refused: {exc}")
            raise
        except errors.AbFlasherError as exc:
            self._record(target.name, "incomplete", result=f"failed: {exc}")
            raise
        with self.state.edit() as state:
            self._mark_armed(state, system, target, installed)
        message = f"version {version} installed in slot {target.name}; reboot into it to try it"
        rebooting = False
        if request.reboot:
            self._reboot_tryboot()
            rebooting = True
            message = f"version {version} installed in slot {target.name}; rebooting into it on trial"
        return UpdateOutcome(target.name, version, result.sha256, rebooting, message)

    @staticmethod
    def _mark_armed(state: dict[str, Any], system: _System, target: Slot, installed: dict[str, Any]) -> None:
        state["slots"].setdefault(target.name, {}).update(state="trial", installed=dict(installed))
        state["trial"] = {"slot": target.name, "armed_boot_id": system.boot_id}
        state["primary"] = system.primary
        # The slot we came from runs and is committed: it is what a rollback returns to.
        state["slots"].setdefault(system.booted.name, {})["state"] = "good"

    def _run_dir(self) -> Path:
        run_dir = Path(self.config.run_dir)
        run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        return run_dir

    def _fetch_boot_artifact(self, prepared: PreparedUpdate, workdir: Path, cancel: threading.Event) -> Path | None:
        """The new slot's boot files as published next to the image (boot_artifact_url), checked against their
        sha256; None when none is configured (then the running slot's boot files are copied)."""
        from abflasher.image.checksums import fetch_checksum
        from abflasher.image.http import http_options, open_http

        request = prepared.request
        if not self.config.boot_artifact_url or not request.version:
            return None
        url = self.config.boot_artifact_url.replace("{version}", request.version)
        check_http_url(url, "boot artifact")
        name = os.path.basename(url.split("?", 1)[0]) or "boot-artifact"
        expected: str | None = None
        checksum_url = self.config.checksum_url_for(request.version, url)
        if checksum_url:
            expected = fetch_checksum(checksum_url, name, **http_options(self.config, cancel))
        elif self.config.require_checksum:
            raise errors.InvalidArgument("no checksum for the boot artifact: configure checksum_url")
        path = workdir / name
        digest = hashlib.sha256()
        source = open_http(self.config, url, label="boot artifact", cancel=cancel)
        try:
            with open(path, "wb") as handle:
                while chunk := source.read(1 << 20):
                    if cancel.is_set():
                        raise errors.Cancelled("the update was cancelled")
                    digest.update(chunk)
                    handle.write(chunk)
        finally:
            source.close()
        if expected is not None and digest.hexdigest() != expected:
            raise errors.ChecksumMismatch(
                f"boot artifact {name}: sha256 {digest.hexdigest()}, its checksum file says {expected}"
            )
        return path

    def _unmount_leftovers(self) -> None:
        """Unmount new roots a killed job left mounted in run_dir (its own, 0700): they would hold the target busy.
        A power cut clears them by itself; a killed service, restarted by systemd, does not."""
        for mountpoint in sorted(self._run_dir().glob("slot-*")):
            if os.path.ismount(mountpoint):
                done = self._run(["umount", str(mountpoint)], 120)
                if done.returncode != 0:
                    raise errors.DeviceError(f"a root left mounted on {mountpoint} by an interrupted update cannot be "
                                             f"unmounted: {done.stderr.strip()}")
            with contextlib.suppress(OSError):
                mountpoint.rmdir()

    @contextlib.contextmanager
    def _mounted(self, device: str) -> Iterator[Path]:
        mountpoint = Path(tempfile.mkdtemp(prefix="slot-", dir=self._run_dir()))
        try:
            done = self._run(["mount", "-t", "ext4", "-o", "rw,nosuid,nodev,noexec", device, str(mountpoint)], 120)
            if done.returncode != 0:
                raise errors.BadImage(
                    f"the new root file system on {device} cannot be mounted: {done.stderr.strip()}"
                )
            try:
                yield mountpoint
            finally:
                umount = self._run(["umount", str(mountpoint)], 120)
                if umount.returncode != 0:
                    log.error("umount %s failed: %s", mountpoint, umount.stderr.strip())
        finally:
            with contextlib.suppress(OSError):
                mountpoint.rmdir()

    def _fix_up_root(
        self, system: _System, target: Slot, request: UpdateRequest, installed: dict[str, Any]
    ) -> str:
        """Point the new root's fstab at its own partitions; check the version and board it carries; give it the
        state as it will be once its trial is armed (see StateFile)."""
        with open(target.root_device, "rb") as handle:
            head = handle.read(2048)
        if head[1080:1082] != b"\x53\xef":
            raise errors.Incompatible(
                "the image is not an ext2/3/4 root file system (ab-flasher writes root partition images, "
                "not whole-disk images)"
            )
        with self._mounted(target.root_device) as root:
            version = read_version_file(_read_or_none(root / VERSION_FILE))
            if not version:
                raise errors.BadImage(f"the image has no readable /{VERSION_FILE}: it is not an ab-flasher slot image")
            try:
                parse_version(version)
            except errors.InvalidArgument:
                # Not quoted: the file came with the image, and is no caller's argument.
                raise errors.BadImage(
                    f"the image's /{VERSION_FILE} does not hold a valid version (like 1.4.0)"
                ) from None
            if request.version and compare_versions(version, request.version) != 0:
                raise errors.BadImage(f"the image holds version {version}, not the requested {request.version}")
            if not request.version:
                booted_version = slot_version(system.booted, booted=True, root_path=self.config.root_path)
                self._check_order(version, booted_version, request.allow_downgrade)
            compatible = read_version_file(_read_or_none(root / COMPATIBLE_FILE))
            if self.config.compatible and compatible and compatible != self.config.compatible:
                raise errors.Incompatible(
                    f"the image is for {compatible!r}, this device is {self.config.compatible!r}"
                )
            fstab_path = root / "etc" / "fstab"
            fstab = fstab_path.read_text() if fstab_path.is_file() else ""
            new_fstab = self._fstab_for(system, target, fstab)
            if new_fstab != fstab:
                st = fstab_path.stat() if fstab_path.exists() else None
                _write_atomically(
                    fstab_path,
                    new_fstab,
                    mode=st.st_mode & 0o7777 if st else 0o644,
                    owner=(st.st_uid, st.st_gid) if st else None,
                )
            installed["version"] = version
            inside = self._state_in_root()
            if inside is not None:
                carried = self.state.load()
                self._mark_armed(carried, system, target, installed)
                _write_atomically(
                    root / inside.lstrip("/"), StateFile.dump(self.state.stamp(carried)), mode=STATE_FILE_MODE
                )
        return version

    def _fstab_for(self, system: _System, target: Slot, image_fstab: str) -> str:
        """The new root's fstab: its own root and boot partitions, and the data partition where the running system
        mounts it (by role, never by partition number: the image may come from the other layout)."""
        data = system.layout.data_partition
        running = _read_or_none(Path(self.config.root_path, "etc", "fstab")) or b""
        return bootfiles.fstab_for_slot(
            image_fstab,
            running.decode("utf-8", "replace"),
            root=f"PARTUUID={target.root_partuuid}",
            boot=f"PARTUUID={target.boot_partuuid}",
            data=f"PARTUUID={system.layout.table.partition(data).partuuid}" if data is not None else None,
        )

    # ----------------------------------------------------------------------------------------------- booting

    def _reboot_tryboot(self) -> None:
        for command in (self.config.tryboot_command, self.config.tryboot_fallback_command):
            if not command:
                continue
            try:
                done = self._run(command, 60)
            except FileNotFoundError:
                continue
            if done.returncode == 0:
                return
            log.warning("%s failed: %s", " ".join(command), done.stderr.strip())
        raise errors.Internal("could not reboot into the trial: every configured reboot command failed")

    def reboot(self, mode: str) -> None:
        if mode == "normal":
            done = self._run(self.config.reboot_command, 60)
            if done.returncode != 0:
                raise errors.Internal(f"reboot failed: {done.stderr.strip()}")
            return
        if mode == "trial":
            system = self._system()
            state = self.state.load()
            armed = state.get("trial", {}).get("slot")
            if armed is None or armed == system.booted.name or system.boot.trial_slot() != armed:
                raise errors.NoTrial("no slot is waiting for a trial boot: install an update first")
            self._reboot_tryboot()
            return
        if mode == "recovery":
            raise errors.Incompatible("this device has no recovery slot")
        raise errors.InvalidArgument(f"unknown reboot mode {mode!r}: use normal, trial or recovery")

    def _require_trial(self) -> tuple[_System, dict[str, Any]]:
        system = self._system()
        state = self.state.load()
        if not self._trial_active(system, state):
            raise errors.NoTrial(
                f"slot {system.booted.name} is not running on trial (it is the committed slot, or was rolled back to)"
            )
        return system, state

    def mark_good(self) -> None:
        with self._exclusive():
            system, _ = self._require_trial()
            self._commit(system)

    def _commit(self, system: _System) -> None:
        system.boot.commit(system.booted.name)
        with self.state.edit() as state:
            state["slots"].setdefault(system.booted.name, {})["state"] = "good"
            state["slots"][system.booted.name].setdefault("installed", {})["result"] = "committed"
            state.pop("trial", None)
            state["primary"] = system.booted.name

    def mark_bad(self) -> None:
        with self._exclusive():
            system, _ = self._require_trial()
            self._reject(system, "rejected")

    def _reject(self, system: _System, why: str) -> None:
        # A stray tryboot must not start the rejected slot again.
        system.boot.disarm()
        with self.state.edit() as state:
            state["slots"].setdefault(system.booted.name, {})["state"] = "bad"
            state["slots"][system.booted.name].setdefault("installed", {})["result"] = why
            state.pop("trial", None)
            state["primary"] = system.primary

    # --- the commit deadline (abflasher/deadline.py) ---
    def trial_undecided(self) -> bool | None:
        """Is the booted slot on trial, neither committed nor rejected-and-left-running? None: not an A/B disk."""
        try:
            system = self._system()
        except errors.Incompatible:
            return None
        state = self.state.load()
        if not self._trial_active(system, state):
            return False
        rejected = state["slots"].get(system.booted.name, {}).get("state") == "bad"
        return not rejected or self.config.reboot_on_failed_health

    def reject_overdue_trial(self, why: str, *, wait: float) -> str:
        """Record the booted trial slot as bad: "rejected"; "locked" when the state stayed locked for ``wait``;
        "decided" when the boot-check committed (or rejected) it meanwhile."""
        try:
            with self._exclusive(wait=wait):
                if not self.trial_undecided():
                    return "decided"
                self._reject(self._system(), why)
        except errors.Busy:
            return "locked"
        return "rejected"

    def rollback(self) -> None:
        with self._exclusive():
            system = self._system()
            state = self.state.load()
            if self._trial_active(system, state):
                raise errors.Busy("a trial is running: use mark-bad to reject it instead")
            other = system.layout.other(system.primary)
            recorded = state["slots"].get(other.name, {}).get("state", "unknown")
            version = slot_version(other, booted=other.name == system.booted.name, root_path=self.config.root_path)
            good = recorded == "good" or (recorded == "unknown" and other.name == system.booted.name and version)
            if not good:
                raise errors.InvalidArgument(
                    f"slot {other.name} is {recorded}{f' ({version})' if version else ''}: there is no good slot "
                    "to roll back to"
                )
            system.boot.commit(other.name)
            with self.state.edit() as state:
                state["primary"] = other.name
                state["slots"].setdefault(other.name, {})["state"] = "good"
                if other.name == system.booted.name:
                    state.pop("rollback_boot_id", None)
                else:
                    state["rollback_boot_id"] = system.boot_id

    def check(self) -> CheckResult:
        from abflasher.image.http import open_http

        if not self.config.channel_url:
            raise errors.InvalidArgument(
                "no update channel configured (channel_url in /etc/ab-flasher/ab-flasher.conf)"
            )
        source = open_http(self.config, self.config.channel_url, label="update channel")
        try:
            text = source.read(4096).decode("utf-8", "replace")
        finally:
            source.close()
        available = text.strip().splitlines()[0].strip() if text.strip() else ""
        try:
            parse_version(available)
        except errors.InvalidArgument:
            # Not quoted: what a server sent is not the service's to repeat to its callers.
            raise errors.Network(
                f"the update channel {redact_url(self.config.channel_url)} does not name a version on its first "
                "line (expected one like 1.4.0)"
            ) from None
        system = self._system()
        current = slot_version(system.booted, booted=True, root_path=self.config.root_path)
        newer = not current or compare_versions(available, current) > 0
        return CheckResult(current=current, available=available, update_available=newer)

    # ----------------------------------------------------------------------------------------------- on boot

    def run_health_checks(self) -> tuple[bool, str]:
        """Every executable in health.d must exit 0 in time; then systemd must say the system is running."""
        failures: list[str] = []
        health_dir = Path(self.config.health_dir)
        checks = sorted(p for p in health_dir.iterdir() if p.is_file()) if health_dir.is_dir() else []
        for check in checks:
            if not os.access(check, os.X_OK):
                log.info("health check %s is not executable; skipped", check)
                continue
            try:
                done = self._run_check([str(check)], self.config.health_timeout)
            except subprocess.TimeoutExpired:
                failures.append(f"{check.name} timed out after {self.config.health_timeout:g} s")
                continue
            except OSError as exc:
                failures.append(f"{check.name} could not run: {exc.strerror}")
                continue
            if done.returncode != 0:
                detail = (done.stderr or done.stdout).strip().splitlines()
                failures.append(f"{check.name} exited {done.returncode}" + (f": {detail[-1]}" if detail else ""))
        if self.config.health_systemd != "off" and Path("/run/systemd/system").is_dir():
            try:
                done = self._run(["systemctl", "is-system-running", "--wait"], self.config.health_timeout)
                status = done.stdout.strip()
            except (subprocess.TimeoutExpired, OSError) as exc:
                status = f"unknown ({exc})"
            allowed = {"running"} | ({"degraded"} if self.config.health_systemd == "degraded-ok" else set())
            if status not in allowed:
                failures.append(f"systemd reports the system {status}")
        if failures:
            return False, "; ".join(failures)
        return True, f"{len(checks)} health checks passed"

    def boot_check(self) -> BootCheckResult:
        """Reconcile the state with what booted; on a trial boot, run the health checks and commit or reject."""
        # At boot the service may be answering a call at the same moment: wait for it rather than fail.
        with self._exclusive(wait=BOOT_CHECK_LOCK_WAIT):
            state = self.state.load()
            _layout, boot, booted = self._disk()
            # Repair before anything reads the boot files: a torn autoboot.txt must not stop the check.
            repaired = boot.repair(state.get("primary") or booted.name)
            if repaired:
                log.warning("repaired boot files: %s", "; ".join(repaired))
            system = self._system()
            if not self._trial_active(system, state):
                return self._reconcile_normal_boot(system, state)
            armed = state.get("trial", {}).get("slot")
            if armed != system.booted.name:
                # A tryboot nobody armed (a stray `reboot '0 tryboot'`): never commit what we did not install.
                self._reject(system, "booted on trial without being armed")
                message = f"slot {system.booted.name} was started on trial but no update armed it; not committed"
                if self.config.reboot_on_failed_health:
                    self.reboot("normal")
                    message += "; rebooting into slot " + system.primary
                return BootCheckResult(True, False, message)
            healthy, detail = self.run_health_checks()
            if healthy:
                self._commit(system)
                return BootCheckResult(True, True, f"slot {system.booted.name} committed: {detail}")
            self._reject(system, f"health check failed: {detail}")
            message = f"slot {system.booted.name} failed its health checks ({detail}); not committed"
            if self.config.reboot_on_failed_health:
                self.reboot("normal")
                message += "; rebooting into slot " + system.primary
            return BootCheckResult(True, False, message)

    def _reconcile_normal_boot(self, system: _System, loaded: dict[str, Any]) -> BootCheckResult:
        trial = loaded.get("trial") or {}
        message = f"slot {system.booted.name} booted normally"
        with self.state.edit() as state:
            armed_boot = trial.get("armed_boot_id")
            if trial.get("slot") and trial["slot"] != system.booted.name and armed_boot != system.boot_id:
                # The trial was armed in an earlier boot and we are back on the primary: the trial never committed.
                slot = trial["slot"]
                entry = state["slots"].setdefault(slot, {})
                entry["state"] = "bad"
                entry.setdefault("installed", {})["result"] = "trial boot did not commit; fell back"
                state.pop("trial", None)
                message = f"the trial of slot {slot} did not come up healthy; running slot {system.booted.name}"
            if system.booted.name == system.primary:
                state["slots"].setdefault(system.booted.name, {})["state"] = "good"
            state["primary"] = system.primary
            pending = bool(state.get("trial"))
        if not pending:
            # Nothing waits for a trial (or it fell back): a stray tryboot must start the committed slot. Devices
            # set up by hand, or by older versions, arrive with a trial of the other slot armed.
            system.boot.disarm()
        return BootCheckResult(False, False, message)


def _shown_install(installed: dict[str, Any]) -> dict[str, Any]:
    """A slot's recorded install as callers see it: a source URL without credentials or query, even one that an
    older version stored whole."""
    shown = dict(installed)
    if isinstance(shown.get("source"), str):
        shown["source"] = redact_url(shown["source"])
    return shown


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None
