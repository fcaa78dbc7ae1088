"""Raspberry Pi firmware boot control: the ``prefix`` (os_prefix + tryboot.txt) and ``autoboot`` layouts.

Every change of a file the firmware reads to choose a slot (config.txt, tryboot.txt, autoboot.txt) is an in-place
rewrite of the same size (``FatVolume.write_in_place``, `slotswitch`), so a power cut leaves the old file or the
new one, never a torn one: docs/boot-atomicity.md has the argument step by step. The running slot's boot files are
never written: ``install_boot_files`` only reads them. When no trial is armed, a tryboot starts the primary:
``tryboot.txt`` (prefix) and the ``[tryboot]`` entry of ``autoboot.txt`` (autoboot) name the committed slot.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from abflasher import errors
from abflasher.boot import bootfiles, slotswitch, watchdog
from abflasher.boot.base import Bootloader
from abflasher.boot.fat import FatVolume, open_volume
from abflasher.disk.slots import DiskLayout, Slot

log = logging.getLogger(__name__)

CONFIG_TXT = "config.txt"
TRYBOOT_TXT = "tryboot.txt"
AUTOBOOT_TXT = "autoboot.txt"
CMDLINE_TXT = "cmdline.txt"

VolumeOpener = Callable[[str], FatVolume]


def _root_spec(slot: Slot) -> str:
    return f"PARTUUID={slot.root_partuuid}"


def _fix_cmdline_in_tree(tree: Path, slot: Slot, *, keep_watchdog: bool = False) -> None:
    cmdline = tree / CMDLINE_TXT
    if keep_watchdog and cmdline.is_file():
        cmdline.write_text(watchdog.keep_watchdog_armed(cmdline.read_text()))
    if not cmdline.is_file():
        raise errors.BadImage(f"the boot files for slot {slot.name} have no {CMDLINE_TXT}")
    cmdline.write_text(bootfiles.set_cmdline_root(cmdline.read_text(), _root_spec(slot)))


def extract_boot_tarball(artifact: Path, dest: Path) -> None:
    try:
        with tarfile.open(artifact) as archive:
            members = archive.getmembers()
            for member in members:
                name = os.path.normpath(member.name)
                if name.startswith(("/", "..")) or not (member.isfile() or member.isdir()):
                    raise errors.BadImage(f"boot tarball entry {member.name!r} is not a plain file inside the archive")
            archive.extractall(dest, members=members)
    except tarfile.TarError as exc:
        raise errors.BadImage(f"the boot tarball is unreadable: {exc}") from exc


class _PiBoot:
    def __init__(self, layout: DiskLayout, open_fat: VolumeOpener | None = None, *,
                 trial_watchdog_timeout: int = 0) -> None:
        self.layout = layout
        self._open_fat: VolumeOpener = open_fat or open_volume
        self._firmware: FatVolume | None = None
        #: kernel_watchdog_timeout for trial boots only; 0: not armed (abflasher/boot/watchdog.py).
        self.trial_watchdog_timeout = trial_watchdog_timeout
        #: config.txt settings for trial boots only (the prefix layout puts them in tryboot.txt).
        self.trial_settings: tuple[str, ...] = tuple(watchdog.arming_lines(trial_watchdog_timeout))

    @property
    def firmware(self) -> FatVolume:
        """p1: the partition the firmware reads first."""
        if self._firmware is None:
            self._firmware = self._open_fat(self.layout.node(1))
        return self._firmware

    def _read_text(self, volume: FatVolume, name: str) -> str | None:
        data = volume.read(name)
        if data is None:
            return None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise bootfiles.BootFileError(f"{name} on {volume.description} is not text") from exc


class PrefixBoot(_PiBoot):
    """One FAT partition with a/ and b/ folders; config.txt's os_prefix names the committed slot."""

    kind = "prefix"

    def _config(self) -> str:
        text = self._read_text(self.firmware, CONFIG_TXT)
        if text is None:
            raise errors.Incompatible(f"{self.firmware.description} has no {CONFIG_TXT}")
        conditional = bootfiles.conditional_os_prefixes(text)
        if conditional:
            section, value = conditional[0]
            # The firmware would apply it on a matching board and silently override the slot switch.
            raise errors.Incompatible(
                f"{CONFIG_TXT} sets os_prefix={value} under [{section.strip('[]')}]: ab-flasher switches slots "
                "with the os_prefix under [all] only; remove the conditional one"
            )
        return text

    def _slot_for_prefix(self, prefix: str | None, source: str) -> str:
        wanted = (prefix or "").strip("/")
        for slot in self.layout.slots:
            if slot.boot_prefix is not None and slot.boot_prefix.strip("/") == wanted:
                return slot.name
        raise errors.Incompatible(f"{source} has os_prefix={prefix or ''}, which names no slot (expected a/ or b/)")

    def primary(self) -> str:
        return self._slot_for_prefix(bootfiles.config_os_prefix(self._config()), CONFIG_TXT)

    def trial_slot(self) -> str | None:
        text = self._read_text(self.firmware, TRYBOOT_TXT)
        if text is None:
            return None
        try:
            return self._slot_for_prefix(bootfiles.config_os_prefix(text), TRYBOOT_TXT)
        except errors.Incompatible:
            return None

    def _prefix(self, slot: str) -> str:
        prefix = self.layout.slot(slot).boot_prefix
        assert prefix is not None
        return prefix

    def _tryboot(self) -> str:
        """tryboot.txt as it is, created in ab-flasher's form (trying the primary) if it is missing.

        Creating a file that is not there is safe as it is: until the new entry is complete, a trial boot finds no
        tryboot.txt, exactly as before the write.
        """
        text = self._read_text(self.firmware, TRYBOOT_TXT)
        if text is None:
            text = slotswitch.render_tryboot(self._prefix(self.primary()), self.trial_settings)
            self.firmware.write_atomic(TRYBOOT_TXT, text.encode())
        return text

    def _write_if_changed(self, name: str, text: str, changed: str) -> None:
        if changed != text:
            self.firmware.write_in_place(name, changed.encode())

    def _point_tryboot_at(self, slot: str) -> None:
        text = self._tryboot()
        self._write_if_changed(TRYBOOT_TXT, text, slotswitch.retarget_tryboot(text, self._prefix(slot),
                                                                               self.trial_settings))

    def set_trial(self, slot: str) -> None:
        self._config()  # refuses a config.txt whose conditional os_prefix would override the switch
        self._point_tryboot_at(slot)

    def disarm(self) -> None:
        # Already pointing at the primary: nothing to write (the trial settings are refreshed when arming).
        primary = self.primary()
        if self.trial_slot() != primary:
            self._point_tryboot_at(primary)

    def commit(self, slot: str) -> None:
        # config.txt first: in between, a trial boot starts the old primary, a good slot.
        config = self._config()
        self._write_if_changed(CONFIG_TXT, config, slotswitch.set_os_prefix_in_place(config, self._prefix(slot),
                                                                                      CONFIG_TXT))
        self._point_tryboot_at(slot)

    def install_boot_files(self, target: Slot, running: Slot, artifact: Path | None) -> None:
        folder = self._prefix(target.name)
        with tempfile.TemporaryDirectory(prefix="ab-flasher-boot-") as tmp:
            tree = Path(tmp) / "boot"
            tree.mkdir()
            if artifact is not None:
                extract_boot_tarball(artifact, tree)
            else:
                self.firmware.export_tree(self._prefix(running.name), tree)
            _fix_cmdline_in_tree(tree, target, keep_watchdog=self.trial_watchdog_timeout > 0)
            self.firmware.import_tree(tree, folder)

    def repair(self, primary_hint: str | None) -> list[str]:
        repaired = [f"removed stale {name}" for name in self.firmware.cleanup_stale_temp()]
        config = self._read_text(self.firmware, CONFIG_TXT)
        tryboot = self._read_text(self.firmware, TRYBOOT_TXT)
        if config is None:
            # ab-flasher never replaces config.txt, so it was lost some other way; a tryboot.txt of the old form is
            # a full copy of it to rebuild from.
            if tryboot is None or slotswitch.is_own_tryboot(tryboot) or primary_hint is None:
                raise errors.Incompatible(f"{self.firmware.description} has no {CONFIG_TXT}, and nothing to "
                                          "rebuild it from: restore it (with os_prefix=a/ or b/)")
            text = bootfiles.set_config_os_prefix(tryboot, self._prefix(primary_hint))
            self.firmware.write_atomic(CONFIG_TXT, text.encode())
            repaired.append(f"rebuilt {CONFIG_TXT} from {TRYBOOT_TXT} with os_prefix={self._prefix(primary_hint)}")
            return repaired
        if tryboot is None:
            # Without tryboot.txt a stray `reboot '0 tryboot'` finds no kernel and hangs until the watchdog.
            self._tryboot()
            repaired.append(f"created {TRYBOOT_TXT} trying the primary slot")
        elif not slotswitch.is_own_tryboot(tryboot) and \
                bootfiles.config_os_prefix(tryboot) == bootfiles.config_os_prefix(config):
            migrated = slotswitch.tryboot_in_place_of(tryboot, bootfiles.config_os_prefix(config) or "",
                                                      self.trial_settings)
            if migrated is not None:
                self.firmware.write_in_place(TRYBOOT_TXT, migrated.encode())
                repaired.append(f"{TRYBOOT_TXT} now includes {CONFIG_TXT} instead of copying it")
        return repaired


class AutobootBoot(_PiBoot):
    """p1 holds only autoboot.txt; p2/p3 are the slots' own FAT boot partitions."""

    kind = "autoboot"

    def _autoboot(self) -> bootfiles.AutobootConfig:
        text = self._read_text(self.firmware, AUTOBOOT_TXT)
        if text is None:
            raise errors.Incompatible(f"{self.firmware.description} has no {AUTOBOOT_TXT}")
        return bootfiles.parse_autoboot(text)

    def _slot_for_partition(self, number: int | None) -> str | None:
        slot = self.layout.slot_by_boot(number) if number is not None else None
        return slot.name if slot is not None else None

    def primary(self) -> str:
        config = self._autoboot()
        name = self._slot_for_partition(config.boot_partition)
        if name is None:
            raise errors.Incompatible(f"{AUTOBOOT_TXT} has boot_partition={config.boot_partition}, which is no slot")
        return name

    def trial_slot(self) -> str | None:
        return self._slot_for_partition(self._autoboot().tryboot_partition)

    def _boot_partition(self, slot: str) -> int:
        number = self.layout.slot(slot).boot_partition
        assert number is not None
        return number

    def _switch(self, primary: str, trial: str) -> None:
        text = self._read_text(self.firmware, AUTOBOOT_TXT)
        if text is None:
            raise errors.Incompatible(f"{self.firmware.description} has no {AUTOBOOT_TXT}")
        changed = slotswitch.set_autoboot_in_place(text, self._boot_partition(primary), self._boot_partition(trial))
        if changed != text:
            self.firmware.write_in_place(AUTOBOOT_TXT, changed.encode())

    def set_trial(self, slot: str) -> None:
        primary = self.primary()
        if slot == primary:
            raise errors.InvalidArgument(f"slot {slot} is already the primary; there is nothing to try")
        self._switch(primary, slot)

    def commit(self, slot: str) -> None:
        # One sector: the new primary, and a trial boot that starts it too (disarmed).
        self._switch(slot, slot)

    def disarm(self) -> None:
        primary = self.primary()
        self._switch(primary, primary)

    def install_boot_files(self, target: Slot, running: Slot, artifact: Path | None) -> None:
        device = self.layout.node(self._boot_partition(target.name))
        if artifact is not None:
            from abflasher.image.sources import FileSource
            from abflasher.install import install_image

            source = FileSource(artifact)
            try:
                install_image(source, device)
            finally:
                source.close()
            volume = self._open_fat(device)
            cmdline = self._read_text(volume, CMDLINE_TXT)
            if cmdline is None:
                raise errors.BadImage(f"the boot partition image for slot {target.name} has no {CMDLINE_TXT}")
            volume.write_atomic(CMDLINE_TXT, bootfiles.set_cmdline_root(cmdline, _root_spec(target)).encode())
            self._arm_trial_watchdog(volume)
            return
        running_volume = self._open_fat(self.layout.node(self._boot_partition(running.name)))
        with tempfile.TemporaryDirectory(prefix="ab-flasher-boot-") as tmp:
            tree = Path(tmp) / "boot"
            tree.mkdir()
            running_volume.export_tree("/", tree)
            _fix_cmdline_in_tree(tree, target)
            _make_fat(device, label=f"BOOT_{target.name.upper()}")
            self._open_fat(device).import_tree(tree, "/")
        self._arm_trial_watchdog(self._open_fat(device))

    def _arm_trial_watchdog(self, volume: FatVolume) -> None:
        """The new slot's own config.txt gets a [tryboot] section arming the watchdog (read only on its trial boot),
        its cmdline.txt keeps the watchdog armed through the initramfs (abflasher/boot/watchdog.py). Replacing these
        files is safe: no trial points at this partition until it is armed, after this."""
        if self.trial_watchdog_timeout <= 0:
            return
        config = self._read_text(volume, CONFIG_TXT) or ""
        volume.write_atomic(CONFIG_TXT, watchdog.arm_tryboot_section(config, self.trial_watchdog_timeout).encode())
        cmdline = self._read_text(volume, CMDLINE_TXT)
        if cmdline is not None:
            volume.write_atomic(CMDLINE_TXT, watchdog.keep_watchdog_armed(cmdline).encode())

    def repair(self, primary_hint: str | None) -> list[str]:
        repaired = [f"removed stale {name}" for name in self.firmware.cleanup_stale_temp()]
        try:
            self._autoboot()
            return repaired
        except (errors.Incompatible, bootfiles.BootFileError) as exc:
            problem = str(exc)
        if primary_hint is None:
            raise errors.Incompatible(f"{problem}, and no recorded primary slot to rebuild it from")
        # The firmware cannot use what is there now, so replacing it loses nothing even if the write is torn.
        number = self._boot_partition(primary_hint)
        self.firmware.write_atomic(AUTOBOOT_TXT, bootfiles.render_autoboot(number, number).encode())
        repaired.append(f"rebuilt {AUTOBOOT_TXT} with slot {primary_hint} primary ({problem})")
        return repaired


def _make_fat(device: str, *, label: str) -> None:
    mkfs = shutil.which("mkfs.vfat", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if mkfs is None:
        raise errors.DeviceError("mkfs.vfat is missing (install dosfstools)")
    done = subprocess.run([mkfs, "-n", label, device], capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise errors.DeviceError(f"mkfs.vfat {device} failed: {done.stderr.strip() or done.stdout.strip()}")


def bootloader_for(layout: DiskLayout, open_fat: VolumeOpener | None = None, *,
                   trial_watchdog_timeout: int = 0) -> Bootloader:
    if layout.kind == "autoboot":
        return AutobootBoot(layout, open_fat, trial_watchdog_timeout=trial_watchdog_timeout)
    return PrefixBoot(layout, open_fat, trial_watchdog_timeout=trial_watchdog_timeout)
