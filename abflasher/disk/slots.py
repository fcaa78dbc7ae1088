"""Which slots a disk has, which one is booted, and what version each holds.

Two layouts (docs/architecture.md, "Disk layouts"), recognised from the partition table:

- ``prefix``: p1 FAT (firmware + ``a/`` ``b/`` boot folders), p2/p3 roots A/B, optional p4 data;
- ``autoboot``: p1 FAT (``autoboot.txt``), p2/p3 FAT boot A/B, p4 extended, p5/p6 roots A/B, optional p7 data.

The booted slot comes from the device of the mounted root (``stat(root).st_dev`` → ``/sys/dev/block/MAJ:MIN``) and
is cross-checked with ``root=`` on the kernel command line; every path is a parameter so tests point at fixtures.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from abflasher import errors
from abflasher.disk.table import PartitionTable, partition_node

FAT_TYPES = frozenset({"1", "4", "6", "b", "c", "e", "ef"})
LINUX_TYPES = frozenset({"83"})
GPT_LINUX_TYPES = frozenset({"0fc63daf-8483-4772-8e79-3d69d8477de4"})
GPT_FAT_TYPES = frozenset({"ebd0a0a2-b9e5-4433-87c0-68b6b72699c7", "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"})

VERSION_FILE = ".ab_version"
COMPATIBLE_FILE = ".ab_compatible"


@dataclass(frozen=True)
class Slot:
    """One OS slot: a root partition plus where its boot files live."""

    name: str
    role: str
    root_partition: int
    root_device: str
    root_partuuid: str
    size: int
    #: autoboot layout: the slot's own FAT boot partition; prefix layout: None (files live in a folder of p1).
    boot_partition: int | None
    #: prefix layout: the folder on p1 (``a/``); autoboot layout: None.
    boot_prefix: str | None
    #: PARTUUID of the FAT that holds this slot's boot files (what its /etc/fstab mounts at /boot/firmware).
    boot_partuuid: str


@dataclass(frozen=True)
class DiskLayout:
    kind: str
    disk: str
    table: PartitionTable
    data_partition: int | None
    slots: tuple[Slot, ...]

    def slot(self, name: str) -> Slot:
        for slot in self.slots:
            if slot.name == name:
                return slot
        raise errors.InvalidArgument(f"there is no slot {name!r} (slots: {', '.join(s.name for s in self.slots)})")

    def other(self, name: str) -> Slot:
        return next(slot for slot in self.slots if slot.name != name and slot.role == "system")

    def slot_by_root(self, partition: int) -> Slot | None:
        return next((slot for slot in self.slots if slot.root_partition == partition), None)

    def slot_by_boot(self, partition: int) -> Slot | None:
        return next((slot for slot in self.slots if slot.boot_partition == partition), None)

    def slot_by_partuuid(self, partuuid: str) -> Slot | None:
        wanted = partuuid.lower()
        return next((slot for slot in self.slots if slot.root_partuuid == wanted), None)

    def node(self, partition: int) -> str:
        return partition_node(self.disk, partition)


def _is_fat(table: PartitionTable, number: int) -> bool:
    part = next((p for p in table.partitions if p.number == number), None)
    return part is not None and (part.type in FAT_TYPES or part.type in GPT_FAT_TYPES)


def _is_linux(table: PartitionTable, number: int) -> bool:
    part = next((p for p in table.partitions if p.number == number), None)
    return part is not None and (part.type in LINUX_TYPES or part.type in GPT_LINUX_TYPES)


def _has(table: PartitionTable, number: int) -> bool:
    return any(p.number == number for p in table.partitions)


def _describe(table: PartitionTable) -> str:
    return ", ".join(f"p{p.number} type {p.type}" for p in table.partitions) or "no partitions"


def detect_layout(table: PartitionTable, disk: str, forced: str = "auto") -> DiskLayout:
    """The slot layout of ``table``; ``forced`` (prefix | autoboot) skips detection but still checks the table."""
    looks_autoboot = (
        _is_fat(table, 1)
        and _is_fat(table, 2)
        and _is_fat(table, 3)
        and _is_linux(table, 5)
        and _is_linux(table, 6)
    )
    looks_prefix = _is_fat(table, 1) and _is_linux(table, 2) and _is_linux(table, 3)
    kind = forced
    if forced == "auto":
        kind = "autoboot" if looks_autoboot else "prefix" if looks_prefix else ""
    if kind == "autoboot" and not looks_autoboot:
        raise errors.Incompatible(
            f"{disk} does not have the autoboot layout (p1 FAT, p2/p3 FAT boot, p5/p6 Linux roots): {_describe(table)}"
        )
    if kind == "prefix" and not looks_prefix:
        raise errors.Incompatible(
            f"{disk} does not have the prefix layout (p1 FAT, p2/p3 Linux roots): {_describe(table)}"
        )
    if not kind:
        raise errors.Incompatible(
            f"{disk} has neither A/B layout ab-flasher knows (prefix: p1 FAT, p2/p3 roots; autoboot: p1 FAT, "
            f"p2/p3 FAT boot, p5/p6 roots): {_describe(table)}"
        )

    def slot(name: str, root: int, boot: int | None) -> Slot:
        return Slot(
            name=name,
            role="system",
            root_partition=root,
            root_device=partition_node(disk, root),
            root_partuuid=table.partition(root).partuuid,
            size=table.size_bytes(root),
            boot_partition=boot,
            boot_prefix=f"{name}/" if boot is None else None,
            boot_partuuid=table.partition(boot if boot is not None else 1).partuuid,
        )

    if kind == "prefix":
        slots = (slot("a", 2, None), slot("b", 3, None))
        data = 4 if _is_linux(table, 4) else None
    else:
        slots = (slot("a", 5, 2), slot("b", 6, 3))
        data = 7 if _has(table, 7) else None
    return DiskLayout(kind=kind, disk=disk, table=table, data_partition=data, slots=slots)


@dataclass(frozen=True)
class BootedRoot:
    """The block device the running root file system is on, as the kernel sees it."""

    disk: str | None
    partition: int | None
    cmdline_root: str | None


def kernel_cmdline_root(proc_path: str) -> str | None:
    try:
        words = Path(proc_path, "cmdline").read_text().split()
    except OSError:
        return None
    roots = [word.removeprefix("root=") for word in words if word.startswith("root=")]
    return roots[-1] if roots else None


def find_booted_root(*, root_path: str, proc_path: str, sys_path: str, dev_path: str = "/dev") -> BootedRoot:
    """Disk and partition number of the device mounted at ``root_path``, plus the kernel's ``root=``."""
    cmdline_root = kernel_cmdline_root(proc_path)
    dev = os.stat(root_path).st_dev
    sys_dev = Path(sys_path, "dev", "block", f"{os.major(dev)}:{os.minor(dev)}")
    try:
        partition = int(Path(sys_dev, "partition").read_text())
        disk_name = Path(os.path.realpath(sys_dev)).parent.name
    except (OSError, ValueError):
        # Not a partition of a block device (overlay, tmpfs, NFS root): fall back to root= alone.
        return BootedRoot(None, None, cmdline_root)
    return BootedRoot(os.path.join(dev_path, disk_name), partition, cmdline_root)


def booted_slot(layout: DiskLayout, booted: BootedRoot) -> Slot:
    """The slot running now; an error when the evidence is missing or contradicts itself."""
    by_device: Slot | None = None
    on_this_disk = booted.disk is not None and os.path.realpath(booted.disk) == os.path.realpath(layout.disk)
    if on_this_disk and booted.partition is not None:
        by_device = layout.slot_by_root(booted.partition)
        if by_device is None:
            raise errors.Incompatible(
                f"the running root is partition {booted.partition} of {layout.disk}, which is not a slot"
            )
    by_cmdline: Slot | None = None
    root = booted.cmdline_root
    if root is not None:
        if root.upper().startswith("PARTUUID="):
            by_cmdline = layout.slot_by_partuuid(root.split("=", 1)[1])
        elif root.startswith("/dev/"):
            by_cmdline = next((s for s in layout.slots if s.root_device == root), None)
    if by_device is not None and by_cmdline is not None and by_device != by_cmdline:
        raise errors.Incompatible(
            f"the running root is slot {by_device.name} ({by_device.root_device}) but the kernel command line "
            f"says root={root}: refusing to guess which slot is booted"
        )
    slot = by_device or by_cmdline
    if slot is None:
        raise errors.Incompatible(
            f"cannot tell which slot of {layout.disk} is running (root device "
            f"{booted.disk or '?'} partition {booted.partition or '?'}, root={root or '?'})"
        )
    return slot


def read_version_file(data: bytes | None) -> str:
    if not data:
        return ""
    text = data.decode("utf-8", "replace").strip()
    return text if text and "\n" not in text and text.isprintable() else ""


def read_file_from_ext(device: str, path: str) -> bytes | None:
    """A file from an (unmounted) ext2/3/4 file system, read without mounting it (debugfs opens read-only)."""
    try:
        done = subprocess.run(
            ["debugfs", "-R", f"cat {path}", device],
            capture_output=True,
            timeout=60,
            check=False,
            env={**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"},
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0 or b"File not found" in done.stderr or b"Bad magic" in done.stderr:
        return None
    return done.stdout


def slot_version(slot: Slot, *, booted: bool, root_path: str) -> str:
    """The version a slot holds: from the running root for the booted slot, else read without mounting."""
    if booted:
        try:
            return read_version_file(Path(root_path, VERSION_FILE).read_bytes())
        except OSError:
            return ""
    return read_version_file(read_file_from_ext(slot.root_device, "/" + VERSION_FILE))


def read_tryboot_flag(proc_path: str) -> tuple[bool | None, int | None]:
    """The firmware's report of this boot: (tryboot flag, boot partition), None where the device tree lacks it."""
    base = Path(proc_path, "device-tree", "chosen", "bootloader")

    def u32(name: str) -> int | None:
        try:
            data = (base / name).read_bytes()
        except OSError:
            return None
        return int.from_bytes(data[:4], "big") if len(data) >= 4 else None

    flag = u32("tryboot")
    return (None if flag is None else bool(flag)), u32("partition")
