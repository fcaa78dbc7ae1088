"""Which slots a disk has, which one is booted, and what version each holds.

Two boot schemes, each in three variants (docs/layouts.md has the partition tables), recognised from the table:

- ``prefix``: p1 FAT (firmware + one boot folder per slot), p2/p3 roots A/B, optional p4 data; with a recovery slot
  p4 is extended, p5 the recovery root, p6 data; main + recovery: p2 main, p3 extended, p5 recovery, p6 data;
- ``autoboot``: p1 FAT (``autoboot.txt``), p2/p3 FAT boot A/B, p4 extended, p5/p6 roots A/B, optional p7 data; with
  a recovery slot p8/p9 its boot and root; main + recovery: p2/p3 main boot and root, p5/p6 recovery's, p7 data.

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
    variant: str = "ab"  # ab | ab+recovery | main+recovery

    @property
    def recovery(self) -> Slot | None:
        return next((slot for slot in self.slots if slot.role == "recovery"), None)

    def slot(self, name: str) -> Slot:
        for slot in self.slots:
            if slot.name == name:
                return slot
        raise errors.InvalidArgument(f"there is no slot {name!r} (slots: {', '.join(s.name for s in self.slots)})")

    def other(self, name: str) -> Slot | None:
        """The system slot that is not ``name``: where the other copy of the state lives; None in main + recovery
        when ``name`` is main (recovery is read-only and keeps no state of its own)."""
        return next((slot for slot in self.slots if slot.name != name and slot.role == "system"), None)

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


def _looks(table: PartitionTable, fat: tuple[int, ...], linux: tuple[int, ...], extended: tuple[int, ...] = ()) -> bool:
    return (all(_is_fat(table, n) for n in fat) and all(_is_linux(table, n) for n in linux)
            and all(_has(table, n) and table.partition(n).is_extended for n in extended))


#: The partition numbers of each layout (docs/layouts.md): slot -> (root, boot partition or None), and data.
_PREFIX = "prefix"
_AUTOBOOT = "autoboot"
AB = "ab"
AB_RECOVERY = "ab+recovery"
MAIN_RECOVERY = "main+recovery"
VARIANTS = (AB, AB_RECOVERY, MAIN_RECOVERY)
RECOVERY_SLOT = "recovery"
MAIN_SLOT = "main"


@dataclass(frozen=True)
class LayoutShape:
    """Where each slot and the data partition live in one layout; also what `ab-flasher provision` lays out."""

    kind: str  # prefix | autoboot: the boot scheme
    variant: str  # ab | ab+recovery | main+recovery
    #: (slot name, role, root partition, own FAT boot partition or None for a folder of p1)
    slots: tuple[tuple[str, str, int, int | None], ...]
    data: int
    extended: int | None  # the MBR extended partition holding the logical ones

    def matches(self, table: PartitionTable) -> bool:
        fat = (1, *(boot for _, _, _, boot in self.slots if boot is not None))
        linux = tuple(root for _, _, root, _ in self.slots)
        extended = (self.extended,) if self.extended is not None else ()
        return _looks(table, fat, linux, extended)


SHAPES: tuple[LayoutShape, ...] = (
    # The most specific first: a recovery layout also looks like its A/B part.
    LayoutShape(_AUTOBOOT, AB_RECOVERY, (("a", "system", 5, 2), ("b", "system", 6, 3),
                                         (RECOVERY_SLOT, "recovery", 9, 8)), data=7, extended=4),
    LayoutShape(_AUTOBOOT, MAIN_RECOVERY, ((MAIN_SLOT, "system", 3, 2), (RECOVERY_SLOT, "recovery", 6, 5)),
                data=7, extended=4),
    LayoutShape(_AUTOBOOT, AB, (("a", "system", 5, 2), ("b", "system", 6, 3)), data=7, extended=4),
    LayoutShape(_PREFIX, AB_RECOVERY, (("a", "system", 2, None), ("b", "system", 3, None),
                                       (RECOVERY_SLOT, "recovery", 5, None)), data=6, extended=4),
    LayoutShape(_PREFIX, MAIN_RECOVERY, ((MAIN_SLOT, "system", 2, None), (RECOVERY_SLOT, "recovery", 5, None)),
                data=6, extended=3),
    LayoutShape(_PREFIX, AB, (("a", "system", 2, None), ("b", "system", 3, None)), data=4, extended=None),
)


def layout_shape(kind: str, variant: str) -> LayoutShape:
    for shape in SHAPES:
        if (shape.kind, shape.variant) == (kind, variant):
            return shape
    raise errors.InvalidArgument(f"unknown layout {kind} {variant}: use prefix or autoboot, and one of "
                                 f"{', '.join(VARIANTS)}")


def boot_folder(name: str) -> str:
    """The prefix layout's folder on p1 for a slot: its first letter (a/, b/, m/, r/), so every os_prefix value has
    one length and a slot switch stays a one-byte change in place."""
    return f"{name[0]}/"


def detect_layout(table: PartitionTable, disk: str, forced: str = "auto") -> DiskLayout:
    """The slot layout of ``table``; ``forced`` (prefix | autoboot) skips detecting the boot scheme but still checks
    the table. Within a scheme the variant (A/B, A/B + recovery, main + recovery) is told by the table alone."""
    kinds = (_PREFIX, _AUTOBOOT) if forced == "auto" else (forced,)
    shape = next((s for s in SHAPES if s.kind in kinds and s.matches(table)), None)
    if shape is None:
        if forced == "autoboot":
            raise errors.Incompatible(
                f"{disk} does not have the autoboot layout (p1 FAT, p2/p3 FAT boot, p5/p6 Linux roots): "
                f"{_describe(table)}"
            )
        if forced == "prefix":
            raise errors.Incompatible(
                f"{disk} does not have the prefix layout (p1 FAT, p2/p3 Linux roots): {_describe(table)}"
            )
        raise errors.Incompatible(
            f"{disk} has neither A/B layout ab-flasher knows (prefix: p1 FAT, p2/p3 roots; autoboot: p1 FAT, "
            f"p2/p3 FAT boot, p5/p6 roots; or their recovery variants, docs/layouts.md): {_describe(table)}"
        )

    def slot(name: str, role: str, root: int, boot: int | None) -> Slot:
        return Slot(
            name=name,
            role=role,
            root_partition=root,
            root_device=partition_node(disk, root),
            root_partuuid=table.partition(root).partuuid,
            size=table.size_bytes(root),
            boot_partition=boot,
            boot_prefix=boot_folder(name) if boot is None else None,
            boot_partuuid=table.partition(boot if boot is not None else 1).partuuid,
        )

    slots = tuple(slot(*entry) for entry in shape.slots)
    data = shape.data if _is_linux(table, shape.data) else None
    return DiskLayout(kind=shape.kind, disk=disk, table=table, data_partition=data, slots=slots,
                      variant=shape.variant)


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
