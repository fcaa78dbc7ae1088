"""The update state machine (docs/architecture.md): one job at a time, persisted state, health-checked commit.

1. resolve the request (version → URL and expected sha256; refuse up-to-date, downgrades, other boards);
2. pick the target: the slot that is neither booted nor the committed primary, never the booted one;
3. stream + 4. read-back verify (``install_image``), with the target marked *incomplete* in the state file first;
5. fix up the new root (its /etc/fstab and boot files' ``root=`` point at its own PARTUUIDs), check its version;
6. arm a one-shot trial of it; the primary stays the old slot; 7. optionally reboot into the trial;
8. on the trial boot, run the health checks and commit, or reject so the next reset returns to the old slot.

``Updater`` only orchestrates: each operation reads the device once (abflasher/device.py), asks the pure decisions
(abflasher/decisions.py) what to do, and carries it out through the bootloader (abflasher/boot/), the new root
(abflasher/newroot.py), the image's origin (abflasher/image/artifacts.py) and the state file (abflasher/state.py).
The engine never imports D-Bus; the service runs ``run()`` in a worker thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from abflasher import api, carryover, decisions, errors, newroot
from abflasher.autoupdate import last_outcome_summary
from abflasher.boot.fat import FatVolume
from abflasher.commands import Runner, reboot_into_trial, reboot_normally, run_command
from abflasher.config import Config
from abflasher.delta import update as delta
from abflasher.device import DeviceReading, carried_state_path, read_device, read_disk
from abflasher.disk.slots import Slot
from abflasher.health import run_check, run_health_checks
from abflasher.image import artifacts
from abflasher.image.checksums import normalize_sha256
from abflasher.image.locations import redact_url
from abflasher.image.pipeline import Progress
from abflasher.image.sources import ImageSource
from abflasher.joblock import JobLock
from abflasher.state import InstalledImage, SlotState, State, StateFile
from abflasher.trust.policy import TrustRecord, check_manifest, device_compatibles
from abflasher.trust.updates import SignedUpdate, channel_manifest_url, open_channel, open_update, trusted_keys
from abflasher.version import compare_versions, parse_version

log = logging.getLogger(__name__)

BOOT_CHECK_LOCK_WAIT = 120.0


class Updater:
    """Everything privileged ab-flasher does, behind one object per device (thread-safe, one job at a time)."""

    def __init__(
        self,
        config: Config,
        *,
        runner: Runner = run_command,
        open_fat: Callable[[str], FatVolume] | None = None,
        check_runner: Runner = run_check,
    ) -> None:
        self.config = config
        self.state = StateFile(config.state_file)
        self._run = runner
        self._run_check = check_runner  # health checks: killed with their whole process group at the timeout
        self._open_fat = open_fat
        # One change of the device at a time, across threads and processes (the service and the boot check).
        self._exclusive = JobLock(config.state_dir).hold

    # ----------------------------------------------------------------------------------------------- looking

    def _read(self) -> tuple[DeviceReading, State]:
        """One look at the device and the state, for one operation."""
        device = read_device(self.config, self._open_fat)
        return device, self.state.load(device.other_state_copy, device.device_id)

    def _change(self, device: DeviceReading, change: Callable[[State], State]) -> None:
        self.state.update(change, device.other_state_copy, device.device_id)

    def _booted_version(self, device: DeviceReading) -> str:
        return device.version(device.booted, self.config.root_path)

    def status(self) -> api.SystemStatus:
        status = _system_status(*self._read(), self.config.root_path)
        return dataclasses.replace(status, auto_update=last_outcome_summary(self.config))

    # ----------------------------------------------------------------------------------------------- updating

    def prepare(self, request: api.UpdateRequest) -> api.PreparedUpdate:
        signed = trusted_keys(self.config) is not None
        if request.fd is None and not request.version and not signed:
            # No version: the channel's latest.
            request = dataclasses.replace(request, version=artifacts.available_version(self.config))
        if request.version:
            parse_version(request.version)
        if request.sha256:
            from abflasher.image.checksums import normalize_sha256

            normalize_sha256(request.sha256)
        device, state = self._read()
        target = decisions.update_target(device.snapshot, state)
        if request.version:
            decisions.check_version_order(request.version, self._booted_version(device), request.allow_downgrade)
        if request.fd is not None:
            image_url = ""
        elif signed:
            image_url = request.url or channel_manifest_url(self.config)
        else:
            image_url = artifacts.image_url(self.config, request.url, request.version)
        # The description is stored, logged and shown to every bus client: never a password or token.
        description = "uploaded image" if request.fd is not None else redact_url(image_url)
        prepared = api.PreparedUpdate(request, target, image_url, description)
        delta.check_request(self.config, prepared)
        return prepared

    def run(
        self, prepared: api.PreparedUpdate, progress: api.ProgressCallback, cancel: threading.Event
    ) -> api.UpdateOutcome:
        try:
            with self._exclusive(), carryover.stash_dir(newroot.run_dir(self.config)) as stash:
                return self._run_update(prepared, progress, cancel, stash)
        finally:
            if prepared.request.fd is not None:
                with contextlib.suppress(OSError):
                    os.close(prepared.request.fd)

    def _record(self, device: DeviceReading, slot: str, slot_state: SlotState, **installed: Any) -> None:
        self._change(device, lambda state: decisions.recorded(state, slot, slot_state, **installed))

    def _run_update(
        self, prepared: api.PreparedUpdate, progress: api.ProgressCallback, cancel: threading.Event, stash: Path
    ) -> api.UpdateOutcome:
        from abflasher.delta.install import DeltaResult
        from abflasher.install import InstallResult, install_image

        request = prepared.request
        progress(Progress("preparing", 0, None, 0))
        device = read_device(self.config, self._open_fat)
        decisions.check_target(device.snapshot, prepared.target_slot)
        target = device.layout.slot(prepared.target_slot)
        newroot.unmount_leftovers(self.config, self._run)
        # A signed update's manifest is verified and accepted before anything changes (abflasher/trust/).
        incoming = self._open_signed(device, prepared, cancel)
        signed = incoming if isinstance(incoming, SignedUpdate) else None
        try:
            if signed is not None:
                expected: str | None = signed.image_artifact().sha256
            else:
                expected = artifacts.expected_sha256(self.config, prepared, cancel)
            if cancel.is_set():
                raise errors.Cancelled("the update was cancelled")
            committed = device.layout.slot(device.snapshot.primary)
            device = self._promote_recovery_first(device, target.name)
            # Running recovery, the new slot's boot files (without a boot artifact) and kept files come from the
            # system the device runs normally, not from the recovery system (its kernel may be another).
            keep_from = committed if committed.role == decisions.SYSTEM else target
            boot_files_from = keep_from if device.booted.role == decisions.RECOVERY else device.booted
            preserved = (stash, self._gather_preserved(device, keep_from, stash))
        except BaseException:
            if incoming is not None:
                incoming.close()
            raise
        version_wanted = signed.manifest.version if signed is not None else request.version

        # What each slot held, for a delta update's seeds, before the target is marked incomplete.
        before = self.state.load(device.other_state_copy, device.device_id)
        signed_delta = None
        if signed is not None:
            from abflasher.delta import signed as delta_signed

            try:
                signed_delta = delta_signed.choose(self.config, signed, device=device, target=target, state=before,
                                                   cancel=cancel)
            except BaseException:
                signed.close()
                raise
        # From here on the target is not trusted until every step passed.
        device.boot.disarm()
        self._record(device, target.name, SlotState.INCOMPLETE, version=version_wanted, sha256="",
                     time=int(time.time()), result="writing", source=prepared.description)
        source = None
        streamed = False
        result: InstallResult | DeltaResult
        try:
            if signed_delta is not None:
                result = delta_signed.install(self.config, signed_delta, target=target, progress=progress,
                                              cancel=cancel)
            elif signed is None and incoming is None and delta.is_index_url(prepared.image_url):
                result = delta.install_for_update(
                    self.config, prepared, device=device, target=target, state=before, expected_sha256=expected,
                    progress=progress, cancel=cancel,
                )
            else:
                # Opened inside the try: a first request that fails is a failed install like any other.
                if signed is not None:
                    source = signed.image(cancel)
                elif incoming is not None:
                    source = cast(ImageSource, incoming)
                else:
                    source = artifacts.open_image(self.config, prepared, cancel)
                result = install_image(
                    source,
                    target.root_device,
                    expected_sha256=expected,
                    gzip_impl=self.config.gzip_inflater,
                    source_size=None if signed is not None else request.size,
                    progress=progress,
                    cancel=cancel,
                )
            streamed = True
        except errors.ChecksumMismatch as exc:
            self._record(device, target.name, SlotState.BAD, result=f"failed: {exc}")
            raise
        except errors.AbFlasherError as exc:
            self._record(device, target.name, SlotState.INCOMPLETE, result=f"failed: {exc}")
            raise
        except BaseException:
            self._record(device, target.name, SlotState.INCOMPLETE, result="failed: internal error")
            raise
        finally:
            if source is not None:
                source.close()
            if signed is not None and not streamed:
                signed.close()

        progress(Progress("configuring", 0, None, result.image_size))
        installed = InstalledImage(version=version_wanted, sha256=result.sha256, time=int(time.time()),
                                   result="installed", source=prepared.description, size=result.image_size)
        try:
            version = newroot.fix_up_root(
                self.config, self._run, device.layout, target,
                requested=version_wanted,
                allow_downgrade=request.allow_downgrade,
                booted_version=lambda: self._booted_version(device),
                carried_state=self._carried_state(device, target.name, installed),
                preserved=preserved,
                check_runner=self._run_check,
            )
            if cancel.is_set():
                raise errors.Cancelled("the update was cancelled")
            with tempfile.TemporaryDirectory(prefix="boot-artifact-", dir=newroot.run_dir(self.config)) as tmp:
                if signed is not None:
                    artifact = signed.boot_artifact(Path(tmp), cancel)
                    signed.finish()
                else:
                    artifact = artifacts.fetch_boot_artifact(self.config, prepared, Path(tmp), cancel)
                device.boot.install_boot_files(target, boot_files_from, artifact)
            device.boot.set_trial(target.name)
        except (errors.BadImage, errors.Incompatible, errors.UpToDate, errors.Downgrade) as exc:
            # A complete, verified image that must not run here.
            self._record(device, target.name, SlotState.BAD, result=f"refused: {exc}")
            raise
        except errors.AbFlasherError as exc:
            self._record(device, target.name, SlotState.INCOMPLETE, result=f"failed: {exc}")
            raise
        finally:
            if signed is not None:
                signed.close()
        installed.version = version
        self._change(device, lambda state: decisions.armed(state, device.snapshot, target.name, installed))
        message = f"version {version} installed in slot {target.name}; reboot into it to try it"
        rebooting = False
        if request.reboot:
            reboot_into_trial(self.config, self._run)
            rebooting = True
            message = f"version {version} installed in slot {target.name}; rebooting into it on trial"
        return api.UpdateOutcome(target.name, version, result.sha256, rebooting, message)

    def _open_signed(
        self, device: DeviceReading, prepared: api.PreparedUpdate, cancel: threading.Event
    ) -> SignedUpdate | ImageSource | None:
        """The signed update (its manifest verified, checked against this device and recorded as seen and
        accepted), an upload's plain image, or None for the simple mode's download (abflasher/trust/updates.py)."""
        record = TrustRecord.of(self.state.load(device.other_state_copy, device.device_id))
        incoming = open_update(self.config, prepared, cancel, at=record.floor(time.time()))
        if not isinstance(incoming, SignedUpdate):
            return incoming
        try:
            manifest = incoming.manifest
            # Only a verified manifest is remembered (an unsigned bundle of the simple mode proves nothing): its
            # creation time is proof of the time, even when it is refused below.
            verified = incoming.verified.signer is not None
            if verified:
                self._change(device, lambda state: TrustRecord.of(state).seen(manifest).store(state))
            request = prepared.request
            check_manifest(
                manifest, compatibles=device_compatibles(self.config), booted_version=self._booted_version(device),
                requested_version=request.version, allow_downgrade=request.allow_downgrade,
                record=record, now=time.time(), require_compatible=incoming.verified.signer is not None,
            )
            image = incoming.image_artifact()
            if request.sha256 and normalize_sha256(request.sha256) != image.sha256:
                raise errors.ChecksumMismatch(
                    f"the sha256 given with the request is not the one the signed manifest gives its image "
                    f"({image.sha256})"
                )
            if verified:
                self._change(device, lambda state: TrustRecord.of(state).accepted(manifest).store(state))
            log.info("update %s version %s signed by %s", incoming.description, manifest.version,
                     incoming.verified.signer or "nobody (no trusted keys configured)")
        except BaseException:
            incoming.close()
            raise
        return incoming

    def _promote_recovery_first(self, device: DeviceReading, target: str) -> DeviceReading:
        """Main + recovery: before the main slot (the primary) is written, the running recovery slot becomes the
        committed primary, so a power cut or a failed write boots recovery, never a half-written main."""
        recovery = decisions.recovery_first(device.snapshot, target)
        if recovery is None:
            return device
        device.boot.commit(recovery)
        self._change(device, lambda state: decisions.recovery_promoted(state, device.snapshot))
        log.info("slot %s is the committed primary while slot %s is written", recovery, target)
        return read_device(self.config, self._open_fat)

    def _gather_preserved(self, device: DeviceReading, system: Slot, stash: Path) -> list[str]:
        """The files to keep (config ``preserve``), gathered before the target is written: from the running system,
        or, running recovery, from ``system``, the committed system slot (in main + recovery: main, about to be
        overwritten), whose identity the device has, as long as its root can still be read."""
        if not self.config.preserve:
            return []
        if device.booted.role == decisions.RECOVERY:
            try:
                newroot.check_root_file_system(system.root_device)
                with newroot.mounted(self.config, self._run, system.root_device, read_only=True) as old_root:
                    return carryover.gather_preserved(self.config, old_root, stash)
            except (errors.AbFlasherError, OSError) as exc:
                log.warning("slot %s cannot be read (%s): keeping the recovery system's files instead", system.name,
                            exc)
        return carryover.gather_preserved(self.config, Path(self.config.root_path), stash)

    def _carried_state(
        self, device: DeviceReading, target: str, installed: InstalledImage
    ) -> Callable[[str], tuple[str, str]] | None:
        """The state copy the new root gets: the state as it will be once its trial is armed (see StateFile)."""
        inside = carried_state_path(self.config, device.booted)
        if inside is None:
            return None

        def carried(version: str) -> tuple[str, str]:
            installed.version = version
            state = decisions.armed(
                self.state.load(device.other_state_copy, device.device_id), device.snapshot, target, installed
            )
            return inside, self.state.stamp(state, device.device_id).dump()

        return carried

    # ----------------------------------------------------------------------------------------------- booting

    def reboot(self, mode: str) -> None:
        if mode == "normal":
            reboot_normally(self.config, self._run)
            return
        if mode == "trial":
            device, state = self._read()
            decisions.may_reboot_into_trial(device.snapshot, state, device.boot.trial_slot())
            reboot_into_trial(self.config, self._run)
            return
        if mode == "recovery":
            self._reboot_into_recovery()
            return
        raise errors.InvalidArgument(f"unknown reboot mode {mode!r}: use normal, trial or recovery")

    def _reboot_into_recovery(self) -> None:
        """Update mode: boot the recovery slot once (tryboot); the next reset returns to the primary."""
        with self._exclusive():
            device, _state = self._read()
            plan = decisions.plan_recovery_boot(device.snapshot)
            if plan.tryboot:
                device.boot.set_trial(plan.slot)
                self._change(device, lambda current: decisions.recovery_armed(current, device.snapshot, plan))
        if plan.tryboot:
            reboot_into_trial(self.config, self._run)
        else:
            reboot_normally(self.config, self._run)

    def _on_trial(self) -> DeviceReading:
        device, state = self._read()
        decisions.require_trial(device.snapshot, state)
        return device

    def mark_good(self) -> None:
        with self._exclusive():
            self._commit(self._on_trial())

    def _commit(self, device: DeviceReading) -> None:
        device.boot.commit(device.booted.name)
        self._change(device, lambda current: decisions.committed(current, device.snapshot))

    def mark_bad(self) -> None:
        with self._exclusive():
            self._reject(self._on_trial(), "rejected")

    def _reject(self, device: DeviceReading, why: str) -> None:
        # A stray tryboot must not start the rejected slot again.
        device.boot.disarm()
        self._change(device, lambda current: decisions.rejected(current, device.snapshot, why))

    # --- the commit deadline (abflasher/deadline.py) ---
    def _look_at_trial(self) -> tuple[DeviceReading, bool] | None:
        """The device, and whether its trial is undecided (neither committed nor rejected-and-left-running); None
        when the disk is not an A/B disk."""
        try:
            device, state = self._read()
        except errors.Incompatible:
            return None
        reboot = self.config.reboot_on_failed_health
        return device, decisions.trial_undecided(device.snapshot, state, reboot_on_failed_health=reboot)

    def trial_undecided(self) -> bool | None:
        """Is the booted slot on trial, neither committed nor rejected-and-left-running? None: not an A/B disk."""
        look = self._look_at_trial()
        return None if look is None else look[1]

    def reject_overdue_trial(self, why: str, *, wait: float) -> str:
        """Record the booted trial slot as bad: "rejected"; "locked" when the state stayed locked for ``wait``;
        "decided" when the boot-check committed (or rejected) it meanwhile."""
        try:
            with self._exclusive(wait=wait):
                look = self._look_at_trial()
                if look is None or not look[1]:
                    return "decided"
                self._reject(look[0], why)
        except errors.Busy:
            return "locked"
        return "rejected"

    def rollback(self) -> None:
        with self._exclusive():
            device, state = self._read()
            source = device.layout.slot(decisions.rollback_source(device.snapshot, state))
            plan = decisions.plan_rollback(device.snapshot, state, device.version(source, self.config.root_path))
            device.boot.commit(plan.slot)
            self._change(device, lambda current: decisions.rolled_back(current, device.snapshot, plan))

    def check(self) -> api.CheckResult:
        if trusted_keys(self.config) is not None:
            return self._check_signed()
        available = artifacts.available_version(self.config)
        disk = read_disk(self.config, self._open_fat, with_state_copy=False)
        current = disk.version(disk.booted, self.config.root_path)
        newer = not current or compare_versions(available, current) > 0
        return api.CheckResult(current=current, available=available, update_available=newer)

    def _check_signed(self) -> api.CheckResult:
        """What the signed channel offers, its signature checked (at the device's time floor)."""
        disk = read_disk(self.config, self._open_fat)
        record = TrustRecord.of(self.state.load(disk.other_state_copy, disk.device_id))
        offer = open_channel(self.config, channel_manifest_url(self.config), None, at=record.floor(time.time()))
        manifest = offer.manifest
        current = disk.version(disk.booted, self.config.root_path)
        newer = not current or compare_versions(manifest.version, current) > 0
        image = manifest.image()
        return api.CheckResult(
            current=current, available=manifest.version, update_available=newer,
            signer=str(offer.verified.signer), compatible=manifest.compatible, created=manifest.created,
            expires=manifest.expires or 0, size=image.size,
            download_size=sum(a.compressed_size or 0 for a in manifest.artifacts if not a.is_delta),
            release_notes=manifest.release_notes,
        )

    # ----------------------------------------------------------------------------------------------- on boot

    def run_health_checks(self) -> tuple[bool, str]:
        return run_health_checks(self.config, check_runner=self._run_check, runner=self._run)

    def boot_check(self) -> api.BootCheckResult:
        """Reconcile the state with what booted; on a trial boot, run the health checks and commit or reject."""
        # At boot the service may be answering a call at the same moment: wait for it rather than fail.
        with self._exclusive(wait=BOOT_CHECK_LOCK_WAIT):
            disk = read_disk(self.config, self._open_fat)
            state = self.state.load(disk.other_state_copy, disk.device_id)
            # Repair before anything reads the boot files: a torn autoboot.txt must not stop the check.
            repaired = disk.boot.repair(state.primary or disk.booted.name)
            if repaired:
                log.warning("repaired boot files: %s", "; ".join(repaired))
            device = read_device(self.config, self._open_fat, disk)
            snap = device.snapshot
            if not decisions.trial_active(snap, state):
                settled = decisions.normal_boot(snap, state)
                self._change(device, lambda _: settled.state)
                if settled.disarm:
                    device.boot.disarm()
                return api.BootCheckResult(False, False, settled.message(snap))
            if decisions.trial_boot(snap, state) is decisions.TrialBoot.UNARMED:
                # A tryboot nobody armed (a stray `reboot '0 tryboot'`): never commit what we did not install.
                self._reject(device, "booted on trial without being armed")
                return self._rejected_boot(
                    snap, f"slot {snap.booted} was started on trial but no update armed it; not committed"
                )
            healthy, detail = self.run_health_checks()
            if healthy:
                self._commit(device)
                return api.BootCheckResult(True, True, f"slot {snap.booted} committed: {detail}")
            self._reject(device, f"health check failed: {detail}")
            return self._rejected_boot(snap, f"slot {snap.booted} failed its health checks ({detail}); not committed")

    def _rejected_boot(self, snap: decisions.Snapshot, message: str) -> api.BootCheckResult:
        if self.config.reboot_on_failed_health:
            self.reboot("normal")
            message += "; rebooting into slot " + snap.primary
        return api.BootCheckResult(True, False, message)


def _system_status(device: DeviceReading, state: State, root_path: str) -> api.SystemStatus:
    """What GetSlots and `ab-flasher status` report."""
    snap = device.snapshot
    trial = decisions.trial_active(snap, state)
    slots = []
    for slot in device.layout.slots:
        version = device.version(slot, root_path)
        on_trial = trial and slot.name == snap.booted
        slot_state = decisions.slot_state(snap, state, slot.name, version, on_trial=on_trial)
        record = state.slots.get(slot.name)
        slots.append(
            api.SlotStatus(
                name=slot.name,
                role=slot.role,
                device=slot.root_device,
                partuuid=slot.root_partuuid,
                size=slot.size,
                version=version,
                booted=slot.name == snap.booted,
                primary=slot.name == snap.primary,
                state=slot_state.value,
                installed=_shown_install(record.installed if record is not None else InstalledImage()),
            )
        )
    return api.SystemStatus(
        layout=device.layout.kind,
        booted_slot=snap.booted,
        primary_slot=snap.primary,
        booted_version=next((s.version for s in slots if s.booted), ""),
        trial_active=trial,
        slots=tuple(slots),
    )


def _shown_install(installed: InstalledImage) -> dict[str, Any]:
    """A slot's recorded install as callers see it: a source URL without credentials or query, even one that an
    older version stored whole."""
    shown = installed.to_json()
    if isinstance(shown.get("source"), str):
        shown["source"] = redact_url(shown["source"])
    return shown
