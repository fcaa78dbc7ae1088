"""One look at the device per operation: the partition table, the slots, the bootloader, what booted, and the other
slot's copy of the state file, read once so that the decisions (abflasher/decisions.py) work on one consistent view
and one operation does not scan the disk (sfdisk, debugfs) again for every question it asks."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from abflasher import errors
from abflasher.boot.base import Bootloader
from abflasher.boot.fat import FatVolume
from abflasher.boot.raspberrypi import bootloader_for
from abflasher.config import Config
from abflasher.decisions import SlotView, Snapshot
from abflasher.disk.slots import (
    DiskLayout,
    Slot,
    booted_slot,
    detect_layout,
    find_booted_root,
    read_file_from_ext,
    read_tryboot_flag,
    slot_version,
)
from abflasher.disk.table import read_table


@dataclass(frozen=True)
class DiskReading:
    """The disk as one operation sees it, and the handles it acts through."""

    layout: DiskLayout
    boot: Bootloader
    booted: Slot
    #: The disk identifier that marks this device's state copies.
    device_id: str
    #: The other slot's copy of the state file (None: none, unreadable, or the state is not kept in the root).
    other_state_copy: bytes | None

    def version(self, slot: Slot, root_path: str) -> str:
        return slot_version(slot, booted=slot.name == self.booted.name, root_path=root_path)


@dataclass(frozen=True)
class DeviceReading(DiskReading):
    """The disk plus what the bootloader and the running kernel say: everything the decisions look at."""

    snapshot: Snapshot


def boot_id(config: Config) -> str:
    try:
        return Path(config.proc_path, "sys", "kernel", "random", "boot_id").read_text().strip()
    except OSError:
        return ""


def state_path_in_root(config: Config) -> str | None:
    """Where the state file is inside a root file system, if it lives on the running root (as installed it does:
    /var/lib/ab-flasher); None when it is kept elsewhere (a shared partition, a test's directory)."""
    try:
        if os.stat(config.state_dir).st_dev != os.stat(config.root_path).st_dev:
            return None
    except OSError:
        return None
    return "/" + os.path.relpath(config.state_file, config.root_path)


def _other_copy(layout: DiskLayout, booted: Slot, inside: str) -> bytes | None:
    other = layout.other(booted.name)
    return None if other is None else read_file_from_ext(other.root_device, inside)


def carried_state_path(config: Config, booted: Slot) -> str | None:
    """Where a new root gets its copy of the state: where the running root keeps it. A recovery system runs from a
    read-only root with its state on a tmpfs at the same path (its own root never changes), and still hands the new
    root a copy there."""
    inside = state_path_in_root(config)
    if inside is None and booted.role == "recovery":
        relative = os.path.relpath(config.state_file, config.root_path)
        inside = None if relative.startswith("..") else "/" + relative
    return inside


def read_disk(
    config: Config, open_fat: Callable[[str], FatVolume] | None, *, with_state_copy: bool = True
) -> DiskReading:
    """The slot layout of the disk holding the running root, its bootloader, the booted slot, and (unless not
    wanted) the other slot's state copy."""
    booted_root = find_booted_root(
        root_path=config.root_path, proc_path=config.proc_path, sys_path=config.sys_path, dev_path=config.dev_path
    )
    disk = config.disk or booted_root.disk
    if not disk:
        raise errors.Incompatible(
            "cannot tell which disk holds the slots (the root file system is not on a partition): "
            "set disk= in /etc/ab-flasher/ab-flasher.conf"
        )
    layout = detect_layout(read_table(disk), disk, config.layout)
    boot = bootloader_for(layout, open_fat, trial_watchdog_timeout=config.trial_watchdog_timeout)
    booted = booted_slot(layout, booted_root)
    inside = state_path_in_root(config) if with_state_copy else None
    other_copy = None if inside is None else _other_copy(layout, booted, inside)
    return DiskReading(layout, boot, booted, layout.table.ptuuid, other_copy)


def read_device(
    config: Config, open_fat: Callable[[str], FatVolume] | None, disk: DiskReading | None = None
) -> DeviceReading:
    """``disk`` (read now if not given) and what the bootloader's files and the running kernel say."""
    disk = disk or read_disk(config, open_fat)
    flag, _partition = read_tryboot_flag(config.proc_path)
    snapshot = Snapshot(
        slots=tuple(SlotView(slot.name, slot.role) for slot in disk.layout.slots),
        booted=disk.booted.name,
        primary=disk.boot.primary(),
        tryboot_flag=flag,
        boot_id=boot_id(config),
    )
    return DeviceReading(disk.layout, disk.boot, disk.booted, disk.device_id, disk.other_state_copy, snapshot)
